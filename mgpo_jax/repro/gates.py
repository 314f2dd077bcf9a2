"""What the laptop-scale base can do, measured greedily on held-out scenes through the rollout engine.

  refer_iou50      referring grounding: share of "Where is the <colour> square?" prompts whose box has
                   IoU >= 0.5 with the named square (gate: >= 0.8)
  close_up_acc     the RL question on a close-up crop of the asked square (gate: >= 0.9)
  full_image_acc   the RL question single-turn on the full image (gate: within 10 points of chance)
  mgpo_*           the RL protocol itself at step 0: valid box, target hit, accuracy (for orientation;
                   the target hit is what RL should raise)

  python -m mgpo_jax.repro.gates --hf_dir=mgpo_jax/repro/base [--out=gates.json]
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from absl import app
from absl import flags

from mgpo_jax import sampling
from mgpo_jax.data import schema
from mgpo_jax.data import scenes
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
from mgpo_jax.repro import pretrain
from mgpo_jax.rollout import engine as engine_lib
from mgpo_jax.rollout import parse as parse_lib


def iou(a, b) -> float:
  ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


# Greedy answer length of every gate: a named box ("The square: red056,084,092,120." then its JSON) is
# ~51 tokens. Also the sampler's only new-token bucket, so no call compiles a second length.
MAX_NEW_TOKENS = 64


def sampler_config(cfg: pretrain.PretrainConfig) -> sampling.SamplerConfig:
  return sampling.SamplerConfig(prompt_buckets=(128, 192, 256), new_token_buckets=(MAX_NEW_TOKENS,),
                                patch_buckets=(256, 512), cache_buckets=(256, 512))


def measure(model, tokenizer, cfg: pretrain.PretrainConfig, num: int = 96, seed: int = 2_000_000,
            batch: int = 32) -> dict[str, Any]:
  """The gates' values on `num` held-out scenes (drawn from `seed`)."""
  sampler = sampling.Sampler(model, sampler_config(cfg), tokenizer)
  greedy = dict(temperature=0.0, max_new_tokens=MAX_NEW_TOKENS)
  modes = engine_lib.RolloutMode
  engines = {
      "refer": dataclasses.replace(cfg.rollout(modes.SINGLE_TURN), prompts=pretrain.refer_prompts(cfg.prompt_style),
                                   **greedy),
      "single": dataclasses.replace(cfg.rollout(modes.SINGLE_TURN), **greedy),
      "mgpo": dataclasses.replace(cfg.rollout(modes.MGPO), **greedy),
  }
  engines = {k: engine_lib.RolloutEngine(sampler, tokenizer, v) for k, v in engines.items()}
  refer_hits, close_up, full, mgpo = [], [], [], []
  seeds = pretrain._seeds(seed, num, 0)  # pylint: disable=protected-access
  for start in range(0, num, batch):
    chunk = seeds[start:start + batch]
    refer, crops, questions, targets = [], [], [], []
    for s in chunk:
      img, objects, k, rng = pretrain._decoded(s, cfg)  # pylint: disable=protected-access
      t = objects[k]
      letter = schema.letter(scenes.OPTIONS.index(t.dot))
      refer.append({"id": f"refer-{s}", "question": pretrain.REFER_QUESTION.format(color=t.color), "choices": None,
                    "answer": "A", "image": img})
      q = {"id": f"scene-{s}", "question": scenes.question(t.color), "choices": list(scenes.OPTIONS),
           "answer": letter, "image": img, schema.TARGET_BOX: list(t.box)}
      questions.append(q)
      crops.append(dict(q, image=pretrain.close_up_image(img, pretrain.close_up_box(t, cfg, rng), cfg)))
      targets.append(t)
    key = jax.random.key(seed + start)
    for tr, t in zip(engines["refer"].run(refer, key).trajectories, targets):
      box = parse_lib.parse_bbox(tr.texts[0], cfg.scene.input_side, cfg.scene.input_side).box
      refer_hits.append(box is not None and iou(box, t.box_in) >= 0.5)
    crop_rows = [dict(c, **{schema.TARGET_BOX: None}) for c in crops]
    close_up += [tr.reward for tr in engines["single"].run(crop_rows, key).trajectories]
    full += [tr.reward for tr in engines["single"].run(questions, key).trajectories]
    mgpo += [(tr.reward, float(bool(tr.box_valid and tr.box_valid[0])), tr.target_hit or 0.0)
             for tr in engines["mgpo"].run(questions, key).trajectories]
  m = np.asarray(mgpo, np.float64)
  chance = 1.0 / len(scenes.OPTIONS)
  out = {"num_scenes": num, "chance": chance, "refer_iou50": float(np.mean(refer_hits)),
         "close_up_acc": float(np.mean(close_up)), "full_image_acc": float(np.mean(full)),
         "mgpo_acc": float(m[:, 0].mean()), "mgpo_valid_box": float(m[:, 1].mean()),
         "mgpo_target_hit": float(m[:, 2].mean())}
  out["gates"] = {"refer_iou50 >= 0.8": out["refer_iou50"] >= 0.8, "close_up_acc >= 0.9": out["close_up_acc"] >= 0.9,
                  "|full_image_acc - chance| <= 0.1": abs(out["full_image_acc"] - chance) <= 0.1}
  return out


def measure_dir(hf_dir: str, cfg: pretrain.PretrainConfig = pretrain.PretrainConfig(), **kw) -> dict[str, Any]:
  """`measure` of the base in `hf_dir` (weights, tokenizer)."""
  return measure(params_lib.from_pretrained(hf_dir), tok_lib.load_tokenizer(hf_dir), cfg, **kw)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  out = measure_dir(_HF_DIR.value, num=_NUM.value)
  text = json.dumps(out, indent=1)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  print(text)


if __name__ == "__main__":
  _HF_DIR = flags.DEFINE_string("hf_dir", pretrain.BASE_DIR, "The base (HF folder).")
  _NUM = flags.DEFINE_integer("num", 128, "Held-out scenes.")
  _OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")
  app.run(main)
