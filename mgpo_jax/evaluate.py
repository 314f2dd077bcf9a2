"""Greedy evaluation with the multi-turn protocol: accuracy overall and per category.

  python -m mgpo_jax.evaluate --config=configs/tpu_v5.py --checkpoint=gs://.../run [--step=N]

`--checkpoint` is a trainer workdir, a checkpoint root (`tools/convert_weights.py` output) or a
Hugging Face model directory; without it the config's initial model is evaluated. Writes
<checkpoint or --out_dir>/eval_<step>.json (the numbers, also printed) and
eval_<step>_predictions.jsonl (per sample: id, category, the model's text of each turn, box, reward). The trainer calls `evaluate`
every `train.eval_every` steps.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)


def evaluate(engine, samples: Sequence[Mapping[str, Any]], *, batch_size: int, rng=None,
             categories: Sequence[str] = (), predictions: list | None = None) -> dict[str, float]:
  """Accuracy (mean reward of one greedy rollout per sample) over all processes' samples.

  Every process runs its own `samples`; counts are summed over processes, so each must call this
  (with the same `categories`, the sorted union of the eval set's categories) even with no samples.
  Returns eval/accuracy, eval/accuracy/<category>, eval/valid_box_rate, eval/num_samples, and
  eval/target_hit_rate when the samples carry target boxes (synthetic sets). With a
  `predictions` list, appends one dict per local sample (id, texts of each turn, box, reward).
  """
  rng = jax.random.key(0) if rng is None else rng
  correct, count, boxes, hits = collections.Counter(), collections.Counter(), 0, [0.0, 0.0]
  for start in range(0, len(samples), batch_size):
    batch = samples[start:start + batch_size]
    result = engine.run(batch, rng)
    for tr in result.trajectories:
      category = str(batch[tr.sample_index].get("category", ""))
      correct[category] += float(tr.reward)
      count[category] += 1
      boxes += bool(tr.box_valid) and bool(tr.box_valid[0])
      if tr.target_hit is not None:
        hits[0] += tr.target_hit
        hits[1] += 1
      if predictions is not None:
        predictions.append({"id": str(batch[tr.sample_index].get("id", "")), "category": category,
                            "texts": list(tr.texts), "box": list(tr.boxes[0]) if tr.boxes and tr.boxes[0] else None,
                            "reward": float(tr.reward), "target_hit": tr.target_hit})
  categories = sorted(set(categories) | set(count)) if jax.process_count() == 1 else list(categories)
  local = np.asarray([[correct[c], count[c]] for c in categories] + [hits, [boxes, sum(count.values())]],
                     np.float64).reshape(-1, 2)
  if jax.process_count() > 1:
    local = np.asarray(multihost_utils.process_allgather(local)).sum(axis=0)
  total = max(local[-1, 1], 1.0)
  out = {"eval/accuracy": float(local[:-2, 0].sum() / total), "eval/valid_box_rate": float(local[-1, 0] / total),
         "eval/num_samples": float(local[-1, 1])}
  if local[-2, 1]:  # samples with a target_box (synthetic sets): did the box find it?
    out["eval/target_hit_rate"] = float(local[-2, 0] / local[-2, 1])
  for c, (k, n) in zip(categories, local[:-2]):
    if c and n:
      out[f"eval/accuracy/{c}"] = float(k / n)
  return out


def eval_categories(config) -> list[str]:
  """The eval set's categories (read from the records, without decoding images)."""
  from mgpo_jax import config_schema as schema_lib  # pylint: disable=g-import-not-at-top
  from mgpo_jax.data import readers  # pylint: disable=g-import-not-at-top

  e = config.eval
  cats = set()
  for i, s in enumerate(readers.read_source(e.source, **schema_lib.reader_kwargs(e))):
    if e.num_samples and i >= e.num_samples:
      break
    cats.add(str(s.get("category", "")))
  return sorted(cats)


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from mgpo_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mgpo_jax import config_schema as schema_lib  # pylint: disable=g-import-not-at-top
  from mgpo_jax import experiment  # pylint: disable=g-import-not-at-top
  from mgpo_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from mgpo_jax import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  from mgpo_jax import train  # pylint: disable=g-import-not-at-top
  from mgpo_jax.models.qwen2_5_vl import params as params_lib  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config = FLAGS.config
  experiment.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  schema_lib.validate(config)
  schema_lib.validate_runtime(config, num_devices=jax.device_count(), process_count=jax.process_count(),
                              check_paths=not FLAGS.checkpoint)
  workdir = FLAGS.out_dir or FLAGS.checkpoint or "/tmp/mgpo_eval"
  metrics_lib.makedirs(workdir)
  mesh = experiment.make_mesh(config)
  step = 0
  ckpt = FLAGS.checkpoint
  if ckpt and not ckpt_lib.is_remote(ckpt) and os.path.isfile(os.path.join(ckpt, "config.json")):  # HF dir
    tokenizer = tok_lib.load_tokenizer(ckpt)
    model = params_lib.from_pretrained(ckpt, mesh=mesh)
  elif ckpt:
    root = ckpt_lib.find_root(ckpt)
    assets = os.path.join(root, ckpt_lib.HF_ASSETS)
    # The run's tokenizer travels with its checkpoint (hf_assets); a locally built one is in the workdir.
    if not ckpt_lib.is_remote(assets) and os.path.isfile(os.path.join(assets, "tokenizer.json")):
      tokenizer = tok_lib.load_tokenizer(assets)
    else:
      tokenizer = experiment.load_tokenizer(config, ckpt)
    step = FLAGS.step if FLAGS.step >= 0 else ckpt_lib.latest_step(root)
    model = ckpt_lib.restore_model(root, step=step, mesh=mesh)
  else:
    tokenizer = experiment.load_tokenizer(config, workdir)
    model = experiment.build_model(config, experiment.build_model_config(config, tokenizer), mesh)
  learner = train.Learner(schema_lib.learner_config(config), model.cfg, mesh)
  params = nnx.state(model, nnx.Param)
  policy = experiment.PolicySampler(config, learner, tokenizer, params)
  engine = experiment.make_engine(config, policy.sampler, tokenizer, greedy=True)
  predictions = []
  result = evaluate(engine, experiment.eval_samples(config), batch_size=config.eval.batch_size,
                    categories=eval_categories(config), predictions=predictions)
  print(json.dumps(result, indent=1, sort_keys=True))
  if jax.process_index() == 0:
    metrics_lib.write_file(metrics_lib.join_path(workdir, f"eval_{step}.json"),
                           json.dumps(result, indent=1, sort_keys=True).encode())
  # Every process writes its own samples' rollouts.
  name = f"eval_{step}_predictions" + (f".process{jax.process_index()}" if jax.process_count() > 1 else "")
  metrics_lib.write_file(metrics_lib.join_path(workdir, name + ".jsonl"),
                         "".join(json.dumps(p) + "\n" for p in predictions).encode())


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", "configs/cpu_tiny.py", "Experiment config (configs/*.py).",
                                  lock_config=True)
  flags.DEFINE_string("checkpoint", "", "Trainer workdir, checkpoint root or HF model directory.")
  flags.DEFINE_integer("step", -1, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("out_dir", "", "Where eval_<step>.json goes (default: --checkpoint).")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs off TPU).")
  flags.DEFINE_integer("num_processes", 0, "Processes of a multi-process run (with --coordinator_address).")
  flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  _define_flags()
  app.run(main)
