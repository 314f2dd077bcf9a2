"""Greedy evaluation with the multi-turn protocol: accuracy overall and per category.

  python -m mgpo_jax.evaluate --config=tpu_v5 --checkpoint=gs://.../run [--step=N]

`--checkpoint` is a trainer workdir, a checkpoint root (`tools/convert_weights.py` output) or a
Hugging Face model directory; without it the config's initial model is evaluated. Writes
<checkpoint or --out_dir>/eval_<step>.json (the numbers, also printed) and
eval_<step>_predictions.jsonl (per sample: id, category, the model's text of each turn, box, reward). The
evaluation loop itself is `mgpo_jax.eval.loop.evaluate`, which the trainer runs every `train.eval_every`
steps.

  python -m mgpo_jax.evaluate ... --benchmarks=vstar,hrbench_4k,hrbench_8k,mme_realworld_lite \
      [--protocol=mgpo|direct] [--max_turns=3] [--data_root=/data] [--benchmark_paths=vstar=/x,...]

evaluates the released benchmarks instead (`mgpo_jax.eval.suite`) and writes benchmarks_<step>_<protocol>.json
/ .md (the table in the paper's column order, counts of scored and skipped questions) and
predictions_<step>_<protocol>_<benchmark>.jsonl (per question: answer, prediction, correctness, texts, boxes,
crops in original pixels, target-in-box).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

# First: quiets third-party notices printed at import time.
from mgpo_jax.programs import console  # pylint: disable=g-bad-import-order

from absl import flags
import jax
from flax import nnx

from mgpo_jax import config as config_lib
from mgpo_jax.eval import loop as eval_loop
from mgpo_jax.eval import suite
from mgpo_jax.io import checkpoint as ckpt_io
from mgpo_jax.io import paths
from mgpo_jax.models.qwen2_5_vl import checkpoint as model_ckpt
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
from mgpo_jax.parallel import sharding as shd
from mgpo_jax.rollout import engine as engine_lib
from mgpo_jax.programs import cli
from mgpo_jax.programs import experiment
from mgpo_jax.programs import flags as program_flags

_CONFIG = cli.define_config_flag("cpu_tiny", "Experiment config (the one the checkpoint was trained with).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Trainer workdir, checkpoint root or HF model directory.")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (default: the latest).")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Where eval_<step>.json goes (default: --checkpoint).")
_BENCHMARKS = flags.DEFINE_string("benchmarks", "", "Comma-separated benchmarks (mgpo_jax.eval.suite.BENCHMARKS), "
                                  "e.g. vstar,hrbench_4k,hrbench_8k,mme_realworld_lite; empty: the config's eval set.")
_PROTOCOL = flags.DEFINE_enum("protocol", "mgpo", [p.value for p in suite.Protocol], "With --benchmarks: "
                              "grounding turn(s) then the answer (mgpo) or a single answer turn (direct).")
_MAX_TURNS = flags.DEFINE_integer("max_turns", -1, "With --protocol=mgpo: turns in all (default: eval.max_turns "
                                  "or rollout.max_turns).")
_DATA_ROOT = flags.DEFINE_string("data_root", "/data", "Where the benchmarks are found under their default names.")
_BENCHMARK_PATHS = flags.DEFINE_string("benchmark_paths", "", "Overrides of the benchmarks' paths, e.g. "
                                       "vstar=/x/vstar_bench,hrbench_8k=/y/hr_bench_8k.tsv.")
_MULTIHOST = program_flags.define_multihost_flags()


def main(argv: Sequence[str]) -> None:
  del argv
  console.quiet_third_party()
  config = _CONFIG.load(config_lib.validate)
  _MULTIHOST.init_distributed()
  config_lib.validate_runtime(config, num_devices=jax.device_count(), process_count=jax.process_count(),
                              check_paths=not _CHECKPOINT.value)
  config = config_lib.parse(config)  # from here on the typed, frozen sections
  if _BENCHMARKS.value:  # a misspelt benchmark fails before the model is loaded
    names = suite.parse_benchmarks(_BENCHMARKS.value)
    bench_paths = {n: os.path.join(_DATA_ROOT.value, suite.BENCHMARKS[n].default_path) for n in names}
    bench_paths.update(suite.parse_paths(_BENCHMARK_PATHS.value))
  workdir = _OUT_DIR.value or _CHECKPOINT.value or "/tmp/mgpo_eval"
  paths.makedirs(workdir)
  mesh = experiment.make_mesh(config)
  step = 0
  ckpt = _CHECKPOINT.value
  if ckpt and not paths.is_remote(ckpt) and os.path.isfile(os.path.join(ckpt, "config.json")):  # HF dir
    tokenizer = tok_lib.load_tokenizer(ckpt)
    model = params_lib.from_pretrained(ckpt, mesh=mesh)
  elif ckpt:
    root = ckpt_io.find_root(ckpt)
    assets = os.path.join(root, ckpt_io.HF_ASSETS)
    # The run's tokenizer travels with its checkpoint (hf_assets); a locally built one is in the workdir.
    if not paths.is_remote(assets) and os.path.isfile(os.path.join(assets, "tokenizer.json")):
      tokenizer = tok_lib.load_tokenizer(assets)
    else:
      tokenizer = experiment.load_tokenizer(config, ckpt)
    step = _STEP.value if _STEP.value >= 0 else ckpt_io.latest_step(root)
    model = model_ckpt.restore_model(root, step=step, mesh=mesh)
  else:
    tokenizer = experiment.load_tokenizer(config, workdir)
    model = experiment.build_model(config, experiment.build_model_config(config, tokenizer), mesh)
  params = nnx.state(model, nnx.Param)
  policy = experiment.make_policy_sampler(config, model.cfg, params, shd.state_shardings(params, mesh), tokenizer)
  if _BENCHMARKS.value:
    return _benchmarks(config, policy.sampler, tokenizer, workdir, step, names, bench_paths)
  engine = experiment.make_engine(config, policy.sampler, tokenizer, greedy=True)
  predictions = []
  result = eval_loop.evaluate(engine, experiment.eval_samples(config), batch_size=config.eval.batch_size,
                              categories=experiment.eval_categories(config), predictions=predictions)
  print(json.dumps(result, indent=1, sort_keys=True))
  if jax.process_index() == 0:
    paths.write_file(paths.join_path(workdir, f"eval_{step}.json"),
                     json.dumps(result, indent=1, sort_keys=True).encode())
  # Every process writes its own samples' rollouts.
  name = f"eval_{step}_predictions" + (f".process{jax.process_index()}" if jax.process_count() > 1 else "")
  paths.write_file(paths.join_path(workdir, name + ".jsonl"),
                   "".join(json.dumps(p) + "\n" for p in predictions).encode())


def _benchmarks(config, sampler, tokenizer, workdir: str, step: int, names, bench_paths) -> None:
  """--benchmarks: each benchmark with --protocol; the table next to per-question predictions."""
  rollout = suite.protocol_rollout(config_lib.rollout_config(config, greedy=True), _PROTOCOL.value,
                                   _MAX_TURNS.value)
  engine = engine_lib.RolloutEngine(sampler, tokenizer, rollout)
  tag = suite.tag(_PROTOCOL.value, rollout.num_turns)
  suffix = f".process{jax.process_index()}" if jax.process_count() > 1 else ""

  def write_predictions(name, predictions):  # every process writes its own questions' rollouts
    paths.write_file(paths.join_path(workdir, f"predictions_{step}_{tag}_{name}{suffix}.jsonl"),
                     "".join(json.dumps(p) + "\n" for p in predictions).encode())

  e = config.eval
  result = suite.run_suite(engine, names, bench_paths, protocol=_PROTOCOL.value, batch_size=e.batch_size,
                           max_image_pixels=config.data.max_image_pixels, num_samples=e.num_samples,
                           image_root=e.image_root, path_prefix=e.path_prefix, on_predictions=write_predictions)
  model = _CHECKPOINT.value or "initial model"
  if jax.process_index() == 0:
    suite.write_outputs(workdir, result, step, model, paths.write_file)
  print(suite.summary_markdown(result, model))


if __name__ == "__main__":
  cli.run(main, "mgpo_jax.evaluate")
