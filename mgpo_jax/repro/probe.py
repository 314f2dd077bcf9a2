"""Diagnostic for the laptop-scale comparison: can the warmed-up model learn WHERE the object is when it
is TOLD?

  python -m mgpo_jax.repro.probe --hf_dir=/tmp/mgpo_repro/seed0/sft/hf --steps=400

This is not part of the comparison, and nothing in it reaches the RL runs. It continues the warm-up
from `hf_dir` on format rows whose turn-1 box is the LABEL: the grid cell that holds most of the target
(the supervision MGPO never gets). It reports the held-out negative log-likelihood of that box per row.
- ln(cells²), e.g. 2.20 nats on a 3x3 grid, is an image-blind uniform choice, which is where the
  warm-up leaves the box.
- 0 is perfect localisation.

If dense labels do not move it in a few thousand rows, the ~7 target hits per RL step (a 1-in-9 random
box x 64 rollouts) cannot teach it in 40 steps either.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from absl import app
from absl import flags
from flax import nnx
from ml_collections import config_flags

from mgpo_jax import config as config_lib
from mgpo_jax.data import synthetic
from mgpo_jax.learner import sft
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.repro import warmup as warmup_lib
from mgpo_jax.rollout import trajectory as traj_lib

logger = logging.getLogger(__name__)


class LabelledCells:
  """Stands in for the generator `warmup.build_rows` draws a format row's random grid cell from: `integers`
  answers, row by row, the index of the cell that holds the most of that row's target."""
  def __init__(self, labels: Sequence[int]):
    self._labels = list(labels)

  def integers(self, n: int, size=None) -> int:  # the one call sft makes per format row
    if size is not None or not self._labels:
      raise RuntimeError("LabelledCells answers one cell index per format row, in order")
    i = self._labels.pop(0)
    if not 0 <= i < n:
      raise RuntimeError(f"label {i} outside the {n} cells")
    return i


def label_cell(sample, image_cfg, cells: int) -> int:
  """Index (into `warmup.grid_boxes`) of the cell that holds the most of the sample's target."""
  _, cover = warmup_lib.grid_cells(sample, warmup_lib.input_size(sample["image"].size, image_cfg), cells)
  return int(np.argmax(cover))


def labelled_rows(samples, tokenizer, model_cfg, rollout_cfg, cells: int, train_answer: bool):
  """Format rows (the MGPO conversation) whose turn-1 box is the label cell; turn 1 is trained, the
  answer only if `train_answer`."""
  cfg = warmup_lib.WarmupData(box_grid=cells, mix=(1.0, 0.0, 0.0))
  rng = LabelledCells([label_cell(s, rollout_cfg.image, cells) for s in samples])
  rows = warmup_lib.build_rows(samples, [warmup_lib.RowKind.FORMAT] * len(samples), tokenizer, model_cfg,
                               rollout_cfg, cfg, rng)  # type: ignore[arg-type]
  if not train_answer:
    for tr in rows:
      s, e = tr.turn_spans[-1]
      tr.turn_mask = tr.turn_mask.copy()
      tr.turn_mask[s:e] = 0
  return rows


def run(config: Any, hf_dir: str, steps: int, eval_every: int, learning_rate: float, num_samples: int,
        num_eval: int, out_path: str | None = None) -> dict[str, Any]:
  """Trains on labelled boxes for `steps` (batch config.repro.sft.batch_size); returns the held-out box
  NLL per row at step 0 and every `eval_every` steps."""
  s = config.repro.sft
  cells, bs = s.box_grid, s.batch_size
  tokenizer = tok_lib.load_tokenizer(hf_dir)
  model_cfg = Qwen25VLConfig.from_pretrained(hf_dir)  # the export's sizes and special-token ids
  rollout_cfg = config_lib.rollout_config(config)
  t0 = time.perf_counter()
  max_px = config.data.max_image_pixels
  train = warmup_lib.decoded(
      synthetic.iter_split(num_samples, s.data_seed, config_lib.synthetic_config(config.data)), max_px)
  held_out = warmup_lib.decoded(
      synthetic.iter_split(num_eval, config.eval.synthetic.seed, config_lib.synthetic_config(config.eval)), max_px)
  logger.info("probe: %d + %d samples in %.0f s", len(train), len(held_out), time.perf_counter() - t0)

  def batch(rows):
    return traj_lib.to_train_batch(rows, list(range(len(rows))), seq_bucket=s.seq_bucket,
                                   patch_bucket=s.patch_bucket, max_images=2, pad_id=tokenizer.pad_token_id,
                                   vision_cfg=model_cfg.vision, max_turns=2,
                                   image_token_id=model_cfg.image_token_id)

  eval_batches = [batch(labelled_rows(held_out[i:i + bs], tokenizer, model_cfg, rollout_cfg, cells, False))
                  for i in range(0, len(held_out), bs)]
  tx = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip_norm or 1e9),
                   optax.adamw(optax.linear_schedule(0.05 * learning_rate, learning_rate, min(20, steps)),
                               weight_decay=0.0))
  trainer = sft.SFTTrainer(params_lib.from_pretrained(hf_dir), tx, config.rl.logprob_chunk_size)

  @jax.jit
  def summed_nll(params, b):
    loss, count = sft.sft_loss(nnx.merge(trainer.graphdef, params), b, config.rl.logprob_chunk_size)
    return loss * count

  def held_out_nll() -> float:
    return sum(float(summed_nll(trainer.params(), b)) for b in eval_batches) / len(held_out)

  curve = [(0, held_out_nll())]
  rng = np.random.default_rng(s.data_seed)
  for step in range(1, steps + 1):
    picked = [train[i] for i in rng.integers(len(train), size=bs)]
    trainer.step(batch(labelled_rows(picked, tokenizer, model_cfg, rollout_cfg, cells, True)))
    if step % eval_every == 0 or step == steps:
      curve.append((step, held_out_nll()))
      logger.info("probe step %d: held-out box NLL %.3f nats/row (image-blind: %.3f)", step, curve[-1][1],
                  math.log(cells * cells))
  result = {"hf_dir": hf_dir, "cells": cells, "image_blind_nll": math.log(cells * cells),
            "learning_rate": learning_rate, "batch_size": bs, "num_train_samples": len(train),
            "num_eval": len(held_out), "held_out_box_nll": curve, "seconds": time.perf_counter() - t0}
  if out_path:
    with open(out_path, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


def main(argv: Sequence[str]) -> None:
  del argv
  logging.basicConfig(level=logging.INFO)
  r = run(_CONFIG.value, _HF_DIR.value, _STEPS.value, _EVAL_EVERY.value, _LR.value, _NUM_SAMPLES.value,
          _NUM_EVAL.value, _OUT.value)
  print(json.dumps(r["held_out_box_nll"]))


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/repro_synthetic.py", "Comparison config.",
                                            lock_config=False)
  _HF_DIR = flags.DEFINE_string("hf_dir", None, "A warm-up export (<workdir>/seed<k>/sft/hf).", required=True)
  _STEPS = flags.DEFINE_integer("steps", 400, "Labelled-box steps.")
  _EVAL_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out NLL every this many steps.")
  _LR = flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate (the warm-up's).")
  _NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000,
                                      "Training pool (the warm-up's size); held decoded, 6-9 MB per sample here.")
  _NUM_EVAL = flags.DEFINE_integer("num_eval", 96, "Held-out samples (the RL eval set).")
  _OUT = flags.DEFINE_string("out", None, "Write the result JSON here.")
  app.run(main)
