"""Greedy evaluation with the multi-turn protocol: accuracy overall and per category.

Used by the training program every `train.eval_every` steps and by `python -m mgpo_jax.evaluate`.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from mgpo_jax.parallel import processes


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
  local = processes.global_sum(local)
  total = max(local[-1, 1], 1.0)
  out = {"eval/accuracy": float(local[:-2, 0].sum() / total), "eval/valid_box_rate": float(local[-1, 0] / total),
         "eval/num_samples": float(local[-1, 1])}
  if local[-2, 1]:  # samples with a target_box (synthetic sets): did the box find it?
    out["eval/target_hit_rate"] = float(local[-2, 0] / local[-2, 1])
  for c, (k, n) in zip(categories, local[:-2]):
    if c and n:
      out[f"eval/accuracy/{c}"] = float(k / n)
  return out
