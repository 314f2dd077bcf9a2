"""MGPO vs single-turn GRPO vs the random-crop control at laptop scale, from the tiny pretrained base.

  python -m mgpo_jax.repro --config=repro_scenes --workdir=/tmp/mgpo_repro

<workdir>/
  base_gates.json            what the base can do (`gates.py`), measured once
  tfds/                      the RL training set (built once)
  seed<k>/mgpo/, seed<k>/grpo/, seed<k>/control/   ordinary `mgpo_jax.main` workdirs
  results.json, results.md, curves.png

Every arm of every seed starts from the same base (`repro.base_dir`, default the committed
mgpo_jax/repro/base). Every stage is skipped when its output exists, and the RL runs resume from their
checkpoints, so the same command continues an interrupted comparison.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

# First: quiets third-party notices printed at import time.
from mgpo_jax.programs import console  # pylint: disable=g-bad-import-order

import numpy as np
from absl import flags

from mgpo_jax import config as config_lib
from mgpo_jax.programs import cli
from mgpo_jax.programs import train as train_program
from mgpo_jax.repro import gates as gates_lib
from mgpo_jax.repro import pretrain
from mgpo_jax.repro.config import METHODS, Repro

logger = logging.getLogger(__name__)


def base_dir(config: Any) -> str:
  return config.repro.base_dir or pretrain.BASE_DIR


def base_gates(config: Any, workdir: str) -> dict[str, Any]:
  """The base's gates on held-out scenes (measured once per workdir)."""
  path = os.path.join(workdir, "base_gates.json")
  if not os.path.isfile(path):
    out = gates_lib.measure_dir(base_dir(config), num=config.repro.gates_num)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  with open(path, encoding="utf-8") as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------------
# RL runs.
# ------------------------------------------------------------------------------------------------


def rl_config(config: Any, method: str, seed: int, hf_dir: str, tfds_dir: str):
  """The RL run of `method` from the base in `hf_dir` (a copy of `config`)."""
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}")
  c = copy.deepcopy(config)
  with c.unlocked():
    c.model.size = "from_hf"
    c.model.init = "hf"
    c.model.hf_dir = hf_dir
    c.model.tokenizer = "hf_dir"
    c.rollout.single_turn, c.rollout.random_crop = METHODS[method]
    c.train.seed = seed
    c.data.tfds_data_dir = tfds_dir
  return c


def run(config: Any, workdir: str) -> dict[str, Any]:
  """The whole comparison; returns the summary (also written to results.json / results.md / curves.png)."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  hf_dir = base_dir(config)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.hf_dir = hf_dir  # what every arm starts from, validated with the rest
  config_lib.validate(config, extra_sections={"repro": Repro})
  t0 = time.perf_counter()
  gates = base_gates(config, workdir)
  timings = {"base_gates": time.perf_counter() - t0}
  for seed in config.repro.seeds:
    for method in config.repro.methods:
      t0 = time.perf_counter()
      run_dir = os.path.join(workdir, f"seed{seed}", method)
      logger.info("seed %d: %s -> %s", seed, method, run_dir)
      train_program.train(rl_config(config, method, seed, hf_dir, os.path.join(workdir, "tfds")), run_dir)
      timings[f"seed{seed}/{method}"] = time.perf_counter() - t0
  summary = summarize(workdir, config.repro.seeds, config.repro.methods)
  summary["base_gates"] = gates
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
      hit_steps, hit = curves[str(seed)]["eval/target_hit_rate"]
      per_seed.append({"seed": seed, "initial_accuracy": acc[0] if steps and steps[0] == 0 else None,
                       "final_accuracy": acc[-1] if acc else None, "final_step": steps[-1] if steps else None,
                       "initial_target_hit": hit[0] if hit_steps and hit_steps[0] == 0 else None,
                       "final_target_hit": hit[-1] if hit else None, "train_seconds": time_s})
    finals = [p["final_accuracy"] for p in per_seed if p["final_accuracy"] is not None]
    initials = [p["initial_accuracy"] for p in per_seed if p["initial_accuracy"] is not None]
    hits = {k: [p[f"{k}_target_hit"] for p in per_seed if p[f"{k}_target_hit"] is not None]
            for k in ("initial", "final")}
    out["methods"][method] = {"per_seed": per_seed, "final_accuracy": _mean_std(finals),
                              "initial_accuracy": _mean_std(initials), "curves": curves,
                              "initial_target_hit": _mean_std(hits["initial"]),
                              "final_target_hit": _mean_std(hits["final"])}
  final = {m: {p["seed"]: p["final_accuracy"] for p in v["per_seed"]} for m, v in out["methods"].items()}
  for other in ("grpo", "control"):  # paired by seed: the same base and sampling seed
    if {"mgpo", other} <= set(final):
      both = [k for k in seeds if final["mgpo"].get(k) is not None and final[other].get(k) is not None]
      out[f"mgpo_minus_{other}"] = _mean_std([final["mgpo"][k] - final[other][k] for k in both])
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
           "| method | eval accuracy, start | eval accuracy, end | eval target hit, start → end | "
           "train reward (first → last step) | valid box (first → last) | rollout target hit (first → last) |",
           "|---|---|---|---|---|---|---|"]
  for method, m in summary["methods"].items():
    c = m["curves"]
    hit = "n/a" if not m["final_target_hit"]["values"] else (
        f"{m['initial_target_hit']['mean']:.2f} → {m['final_target_hit']['mean']:.2f}  "
        f"({', '.join(f'{v:.2f}' for v in m['final_target_hit']['values'])})")
    lines.append(f"| {method} | {_fmt(m['initial_accuracy'])} | {_fmt(m['final_accuracy'])} | {hit} | "
                 f"{_first_last(c, 'train/reward_mean')} | {_first_last(c, 'rollout/valid_box_rate')} | "
                 f"{_first_last(c, 'rollout/target_hit_rate')} |")
  for other, name in (("grpo", "GRPO"), ("control", "the random-crop control")):
    d = summary.get(f"mgpo_minus_{other}", {})
    if d.get("values"):
      lines += ["", f"MGPO − {name}, final eval accuracy of the same seed, in points: {_fmt(d)}; "
                    f"mean − 2 std = {100 * (d['mean'] - 2 * d['std']):.1f}."]
  g = summary.get("base_gates")
  if g:
    lines += ["", f"The base on {g['num_scenes']} held-out scenes: referring box IoU >= 0.5 on "
                  f"{100 * g['refer_iou50']:.1f}%, dot read on a close-up {100 * g['close_up_acc']:.1f}%, "
                  f"single-turn on the full image {100 * g['full_image_acc']:.1f}% (chance "
                  f"{100 * g['chance']:.0f}%); MGPO at step 0: valid box {100 * g['mgpo_valid_box']:.1f}%, "
                  f"target hit {100 * g['mgpo_target_hit']:.1f}%, accuracy {100 * g['mgpo_acc']:.1f}%."]
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
            ("eval/valid_box_rate", "eval (greedy): valid box / box holds the target"),
            ("rollout/valid_box_rate", "rollouts: valid box / box holds the target")]
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8))
  colors = {"mgpo": "tab:red", "grpo": "tab:blue", "control": "tab:green"}

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
      if key.endswith("/valid_box_rate"):
        band(ax, m["curves"], key, f"{method} valid box", color)
        band(ax, m["curves"], key.replace("valid_box_rate", "target_hit_rate"), f"{method} target hit", color, "--")
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
  console.quiet_third_party()
  summary = run(_CONFIG.load(), _WORKDIR.value)
  print(results_markdown(summary))


if __name__ == "__main__":
  _CONFIG = cli.define_config_flag("repro_scenes", "Comparison config.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the comparison.", required=True)
  cli.run(main, "mgpo_jax.repro")
