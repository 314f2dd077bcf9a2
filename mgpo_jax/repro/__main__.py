"""MGPO vs single-turn GRPO at laptop scale: warm-up, both RL runs per seed, results and plot.

  python -m mgpo_jax.repro --config=configs/repro_synthetic.py --workdir=/tmp/mgpo_repro

<workdir>/
  tokenizer/                 BPE trained on the task's texts (shared by every run)
  tfds/                      the RL training set (built once)
  seed<k>/sft/               warm-up: metrics.jsonl, Orbax params, hf/ (the RL runs' starting point)
  seed<k>/mgpo/, seed<k>/grpo/   ordinary `mgpo_jax.main` workdirs (metrics.jsonl, checkpoints, ...)
  results.json, results.md, curves.png

Every stage is skipped when its output exists, and the RL runs resume from their checkpoints, so the
same command continues an interrupted comparison.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from mgpo_jax import config as config_lib
from mgpo_jax.data import schema
from mgpo_jax.data import synthetic
from mgpo_jax.io import metrics as metrics_lib
from mgpo_jax.learner import optim
from mgpo_jax.learner import sft
from mgpo_jax.models.qwen2_5_vl import checkpoint as ckpt_lib
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
from mgpo_jax.programs import experiment
from mgpo_jax.programs import train as train_program
from mgpo_jax.repro import warmup as warmup_lib
from mgpo_jax.repro.config import METHODS, Repro
from mgpo_jax.rollout import prompts as prompts_lib
from mgpo_jax.rollout import trajectory as traj_lib

logger = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------------
# Tokenizer and warm-up.
# ------------------------------------------------------------------------------------------------


def task_corpus(config: Any) -> list[str]:
  """Texts the task's tokenizer is trained on: the prompts, questions, options and answer formats."""
  texts = list(tok_lib.default_corpus())
  for p in (prompts_lib.prompt_style(config.rollout.prompt_style), prompts_lib.PromptConfig()):
    texts += [p.system_prompt, p.grounding_request, p.crop_intro_template, p.invalid_box_intro, p.analyse_crop,
              p.analyse_original, p.answer_format_choices, p.single_turn_system_prompt]
  for s in synthetic.iter_split(16, 0, config_lib.synthetic_config(config.data)):
    texts.append(prompts_lib.single_turn_messages(s["question"], s["choices"], prompts_lib.PromptConfig())[1]
                 ["content"][1]["text"])
  for letter in schema.OPTION_LETTERS[:config.data.synthetic.num_choices]:
    texts.append(warmup_lib.answer_text(letter))
  for x in range(0, 225, 25):
    texts.append(warmup_lib.box_text((x, x, x + 75, x + 75), config.repro.box_label))
  return texts * 3  # BPE merges need repeated pairs


def build_tokenizer(config: Any, workdir: str):

  path = os.path.join(workdir, "tokenizer")
  tok_lib.build_tokenizer_once(path, vocab_size=config.model.tokenizer_vocab_size, corpus=task_corpus(config))
  return tok_lib.load_tokenizer(path), path


def warmup(config: Any, seed: int, tokenizer, tokenizer_path: str, out_dir: str) -> str:
  """Supervised warm-up from a random init; returns the HF export directory (skipped if it exists)."""
  hf_dir = os.path.join(out_dir, "hf")
  if os.path.isfile(os.path.join(hf_dir, "config.json")):
    return hf_dir
  s = config.repro.sft
  model_cfg = experiment.build_model_config(config, tokenizer)
  rollout_cfg = config_lib.rollout_config(config)
  base_cfg = warmup_lib.WarmupData(box_grid=s.box_grid, close_up_min_side=s.close_up_min_side,
                                   single_turn_view=s.single_turn_view)
  # (rows' settings, steps, sequence bucket, patch bucket) per stage: an optional perception stage of
  # cheap one-image close-up rows first (see the config), then the mix of all row kinds.
  stages = [(dataclasses.replace(base_cfg, mix=(0.0, 0.0, 1.0), single_turn_view="close_up"),
             s.perception_steps, s.perception_seq_bucket, s.perception_patch_bucket),
            (dataclasses.replace(base_cfg, mix=tuple(s.mix)), s.steps, s.seq_bucket, s.patch_bucket)]
  total = s.perception_steps + s.steps
  t0 = time.perf_counter()
  samples = warmup_lib.decoded(
      synthetic.iter_split(s.num_samples, s.data_seed + seed, config_lib.synthetic_config(config.data)),
      config.data.max_image_pixels)
  logger.info("seed %d warm-up: %d samples generated in %.0f s", seed, len(samples), time.perf_counter() - t0)

  tx = optim.make_optimizer(optim.OptimConfig(
      learning_rate=s.learning_rate, weight_decay=config.optim.weight_decay,
      grad_clip_norm=config.optim.grad_clip_norm or None, schedule=optim.Schedule.COSINE,
      warmup_steps=min(s.warmup_steps, total - 1), total_steps=total, min_lr_ratio=s.min_lr_ratio))
  trainer = sft.SFTTrainer(params_lib.init_model(model_cfg, seed=seed), tx, config.rl.logprob_chunk_size)
  rng = np.random.default_rng([seed, s.data_seed])
  pad_id = tokenizer.pad_token_id

  def next_batch(data_cfg, seq_bucket, patch_bucket):
    idx = rng.integers(len(samples), size=s.batch_size)
    rows = warmup_lib.build_rows([samples[i] for i in idx], warmup_lib.draw_kinds(s.batch_size, data_cfg, rng),
                                 tokenizer, model_cfg, rollout_cfg, data_cfg, rng)
    return traj_lib.to_train_batch(rows, list(range(len(rows))), seq_bucket=seq_bucket,
                                   patch_bucket=patch_bucket, max_images=2, pad_id=pad_id,
                                   vision_cfg=model_cfg.vision, max_turns=2, image_token_id=model_cfg.image_token_id)

  writer = metrics_lib.MetricsWriter(out_dir, total_steps=total, tensorboard=False)
  pending, step = None, 0
  try:
    for data_cfg, steps, seq_bucket, patch_bucket in stages:
      for _ in range(steps):
        step += 1
        batch = next_batch(data_cfg, seq_bucket, patch_bucket)  # overlaps the previous (async) update
        metrics = trainer.dispatch(batch)
        if pending is not None:
          writer.write_scalars(step - 1, {f"sft/{k}": float(v) for k, v in jax.device_get(pending).items()})
        pending = metrics
    if pending is not None:
      writer.write_scalars(step, {f"sft/{k}": float(v) for k, v in jax.device_get(pending).items()})
  finally:
    writer.close()
  root = os.path.join(out_dir, "checkpoints")
  ckpt_lib.save_params(root, trainer.params(), model_cfg.to_hf_dict(), step=total, assets_from=tokenizer_path)
  ckpt_lib.export_hf(root, hf_dir, overwrite=True)
  logger.info("seed %d warm-up: %d steps in %.0f s -> %s", seed, total, time.perf_counter() - t0, hf_dir)
  return hf_dir


# ------------------------------------------------------------------------------------------------
# RL runs.
# ------------------------------------------------------------------------------------------------


def rl_config(config: Any, method: str, seed: int, hf_dir: str, tfds_dir: str):
  """The RL run of `method` from the warm-up in `hf_dir` (a copy of `config`)."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.size = "from_hf"
    c.model.init = "hf"
    c.model.hf_dir = hf_dir
    c.model.tokenizer = "hf_dir"
    c.rollout.single_turn = METHODS[method]
    c.train.seed = seed
    c.data.tfds_data_dir = tfds_dir
  return c


def run(config: Any, workdir: str) -> dict[str, Any]:
  """The whole comparison; returns the summary (also written to results.json / results.md / curves.png)."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config_lib.validate(config, extra_sections={"repro": Repro})
  tokenizer, tok_path = build_tokenizer(config, workdir)
  timings = {}
  for seed in config.repro.seeds:
    t0 = time.perf_counter()
    hf_dir = warmup(config, seed, tokenizer, tok_path, os.path.join(workdir, f"seed{seed}", "sft"))
    timings[f"seed{seed}/sft"] = time.perf_counter() - t0
    for method in config.repro.methods:
      t0 = time.perf_counter()
      run_dir = os.path.join(workdir, f"seed{seed}", method)
      logger.info("seed %d: %s -> %s", seed, method, run_dir)
      train_program.train(rl_config(config, method, seed, hf_dir, os.path.join(workdir, "tfds")), run_dir)
      timings[f"seed{seed}/{method}"] = time.perf_counter() - t0
  summary = summarize(workdir, config.repro.seeds, config.repro.methods)
  summary["stage_seconds_this_invocation"] = timings
  write_results(workdir, summary)
  return summary


# ------------------------------------------------------------------------------------------------
# Results.
# ------------------------------------------------------------------------------------------------


def read_metrics(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
  return [p[0] for p in pts], [float(p[1]) for p in pts]


def _mean_std(values: Sequence[float]) -> dict[str, Any]:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()) if len(v) else float("nan"), "std": float(v.std()) if len(v) else float("nan"),
          "min": float(v.min()) if len(v) else float("nan"), "max": float(v.max()) if len(v) else float("nan"),
          "values": [float(x) for x in v]}


def summarize(workdir: str, seeds: Sequence[int], methods: Sequence[str]) -> dict[str, Any]:
  """Per method: eval accuracy at the start and the end (mean/std over seeds), curves per seed."""
  out: dict[str, Any] = {"seeds": list(seeds), "methods": {}}
  for method in methods:
    per_seed, curves = [], {}
    for seed in seeds:
      path = os.path.join(workdir, f"seed{seed}", method, "metrics.jsonl")
      if not os.path.isfile(path):
        continue
      rows = read_metrics(path)
      curves[str(seed)] = {k: _series(rows, k) for k in (
          "eval/accuracy", "train/reward_mean", "rollout/valid_box_rate", "rollout/target_hit_rate",
          "eval/target_hit_rate", "eval/valid_box_rate")}
      steps, acc = curves[str(seed)]["eval/accuracy"]
      time_s = sum(r.get("time/step_s", 0.0) for r in rows)
      per_seed.append({"seed": seed, "initial_accuracy": acc[0] if steps and steps[0] == 0 else None,
                       "final_accuracy": acc[-1] if acc else None, "final_step": steps[-1] if steps else None,
                       "train_seconds": time_s})
    finals = [p["final_accuracy"] for p in per_seed if p["final_accuracy"] is not None]
    initials = [p["initial_accuracy"] for p in per_seed if p["initial_accuracy"] is not None]
    out["methods"][method] = {"per_seed": per_seed, "final_accuracy": _mean_std(finals),
                              "initial_accuracy": _mean_std(initials), "curves": curves}
  if {"mgpo", "grpo"} <= set(out["methods"]):  # paired by seed: both start from that seed's warm-up
    final = {m: {p["seed"]: p["final_accuracy"] for p in out["methods"][m]["per_seed"]} for m in ("mgpo", "grpo")}
    both = [k for k in seeds if final["mgpo"].get(k) is not None and final["grpo"].get(k) is not None]
    out["mgpo_minus_grpo"] = _mean_std([final["mgpo"][k] - final["grpo"][k] for k in both])
  return out


def _fmt(ms: Mapping[str, Any]) -> str:
  if not ms["values"]:
    return "n/a"
  return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}  ({', '.join(f'{100 * v:.1f}' for v in ms['values'])})"


def _first_last(curves: Mapping[str, Any], key: str) -> str:
  pairs = [(c[key][1][0], c[key][1][-1]) for c in curves.values() if c.get(key) and c[key][1]]
  if not pairs:
    return "n/a"
  first, last = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
  return f"{first:.2f} → {last:.2f}"


def results_markdown(summary: Mapping[str, Any]) -> str:
  lines = [f"Seeds: {', '.join(map(str, summary['seeds']))}. Accuracy in %: mean ± std over seeds (per seed).", "",
           "| method | eval accuracy, start | eval accuracy, end | train reward (first → last step) | "
           "valid box (first → last) | box finds the target (first → last) |",
           "|---|---|---|---|---|---|"]
  for method, m in summary["methods"].items():
    c = m["curves"]
    lines.append(f"| {method} | {_fmt(m['initial_accuracy'])} | {_fmt(m['final_accuracy'])} | "
                 f"{_first_last(c, 'train/reward_mean')} | {_first_last(c, 'rollout/valid_box_rate')} | "
                 f"{_first_last(c, 'rollout/target_hit_rate')} |")
  if summary.get("mgpo_minus_grpo", {}).get("values"):
    lines += ["", f"MGPO − GRPO, final eval accuracy of the same seed, in points: {_fmt(summary['mgpo_minus_grpo'])}."]
  return "\n".join(lines) + "\n"


def plot(summary: Mapping[str, Any], path: str) -> None:
  """Eval accuracy and train reward vs step for every method (mean line, min-max band over seeds);
  MGPO's valid-box and target-hit rates."""
  # Imported here: matplotlib is slow to import and only the plot needs it; the Agg backend must be chosen
  # before pyplot is imported (no display on the machines this runs on).
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  panels = [("eval/accuracy", "eval accuracy (greedy)"), ("train/reward_mean", "train reward (mean of rollouts)"),
            ("rollout/valid_box_rate", "MGPO rollouts: valid box / box finds the target")]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
  colors = {"mgpo": "tab:red", "grpo": "tab:blue"}

  def band(ax, curves, key, label, color, style="-"):
    runs = [c[key] for c in curves.values() if c.get(key) and c[key][0]]
    if not runs:
      return
    n = min(len(r[0]) for r in runs)
    steps = runs[0][0][:n]
    v = np.asarray([r[1][:n] for r in runs])
    ax.plot(steps, v.mean(0), style, color=color, label=f"{label} (n={len(runs)})")
    ax.fill_between(steps, v.min(0), v.max(0), color=color, alpha=0.15)

  for ax, (key, title) in zip(axes, panels):
    for method, m in summary["methods"].items():
      color = colors.get(method, None)
      if key == "rollout/valid_box_rate":
        band(ax, m["curves"], key, f"{method} valid box", color)
        band(ax, m["curves"], "rollout/target_hit_rate", f"{method} box finds target", color, "--")
      else:
        band(ax, m["curves"], key, method, color)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("RL step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_results(workdir: str, summary: Mapping[str, Any]) -> None:
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write(results_markdown(summary))
  plot(summary, os.path.join(workdir, "curves.png"))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets", "grain"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  summary = run(_CONFIG.value, _WORKDIR.value)
  print(results_markdown(summary))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/repro_synthetic.py", "Comparison config.",
                                            lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the comparison.", required=True)
  app.run(main)
