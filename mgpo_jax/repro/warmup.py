"""The repro's warm-up rows (SFT before RL): the conversation format, with RANDOM boxes, and close-up perception.

A pretrained Qwen2.5-VL already writes grounding JSON and reads small details once they are large; a
model trained from scratch does neither. The warm-up teaches both, and nothing about WHERE to look:

  format rows      MGPO conversation; turn 1 = a box drawn uniformly from a `box_grid` x `box_grid`
                   grid of the model-input image (whatever the image shows), trained; turn 2 = the
                   answer, trained only when that random crop happens to show the target
  close-up rows    the same conversation with turn 1 NOT trained (mask 0): its box holds the target, from
                   3x its size up to a grid cell, so turn 2 learns to read the detail from a close-up
  single-turn rows the GRPO baseline's one-turn format, answer trained; on the original image, or with
                   `single_turn_view="close_up"` on a close-up crop of it (perception of the detail
                   and the one-turn format, without ever training an answer on the shrunk full image)

Box tokens get gradient only from the uniformly random boxes of format rows, so after the warm-up the
box does not depend on the image: choosing the region that holds the target must come from the RL
reward alone (the paper's claim; `box_image_dependence` measures it).

Conversations are built by the rollout engine itself with a `ScriptedSampler` that "samples" given
texts, so the tokens, images and turn masks are exactly those of real rollouts. The update that trains
on them is `mgpo_jax.learner.sft`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from mgpo_jax.data import pipeline
from mgpo_jax.data import schema
from mgpo_jax.models.qwen2_5_vl.chat import special_token_ids
from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig, smart_resize
from mgpo_jax.rollout import crop as crop_lib
from mgpo_jax.rollout import engine as engine_lib
from mgpo_jax.rollout import parse as parse_lib
from mgpo_jax.rollout import trajectory as traj_lib
from mgpo_jax.sampling import SampleOutput, StopReason

logger = logging.getLogger(__name__)


class RowKind(enum.StrEnum):
  FORMAT = "format"
  CLOSE_UP = "close_up"
  SINGLE_TURN = "single_turn"


# ------------------------------------------------------------------------------------------------
# Boxes on a grid of the model-input image.
# ------------------------------------------------------------------------------------------------


def input_size(image_size: tuple[int, int], image_cfg: ImageProcessorConfig) -> tuple[int, int]:
  """(W_in, H_in) the model sees an original of `image_size` = (W, H) at."""
  w, h = image_size
  h_in, w_in = smart_resize(h, w, factor=image_cfg.patch_size * image_cfg.merge_size,
                            min_pixels=image_cfg.min_pixels, max_pixels=image_cfg.max_pixels)
  return w_in, h_in


def grid_boxes(w_in: int, h_in: int, cells: int) -> list[tuple[int, int, int, int]]:
  """The `cells` x `cells` grid's boxes in input pixels, row-major (top-left cell first)."""
  xs = [round(i * w_in / cells) for i in range(cells + 1)]
  ys = [round(i * h_in / cells) for i in range(cells + 1)]
  return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(cells) for i in range(cells)]


def box_text(box: Sequence[int], label: str) -> str:
  """Turn-1 output in the protocol's format."""
  return f'```json\n[{{"bbox_2d": [{", ".join(str(int(v)) for v in box)}], "label": "{label}"}}]\n```'


def answer_text(letter: str) -> str:
  return f"\\boxed{{{letter}}}"


# ------------------------------------------------------------------------------------------------
# Conversations through the rollout engine.
# ------------------------------------------------------------------------------------------------


class ScriptedSampler:
  """A `Sampler` stand-in for `RolloutEngine`: row r "samples" `script(r, turn)` then <|im_end|>."""

  def __init__(self, model_cfg, tokenizer, script: Callable[[int, int], str], pad_id: int, im_end_id: int):
    self.model_cfg, self.tokenizer, self.script = model_cfg, tokenizer, script
    self.pad_id, self.im_end_id = pad_id, im_end_id

  def _emit(self, rows: int, turn: int) -> SampleOutput:
    toks = [self.tokenizer.encode(self.script(r, turn), add_special_tokens=False) + [self.im_end_id]
            for r in range(rows)]
    n = max(len(t) for t in toks)
    tokens = np.full((rows, n), self.pad_id, np.int32)
    for r, t in enumerate(toks):
      tokens[r, :len(t)] = t
    return SampleOutput(tokens=tokens, logprobs=np.zeros((rows, n), np.float32),
                        lengths=np.asarray([len(t) for t in toks], np.int32),
                        stop_reasons=np.full((rows,), int(StopReason.EOS), np.int32),
                        close_logprobs=np.zeros((rows,), np.float32))

  def start(self, chunks, images, **kw):
    del images, kw
    return self._emit(len(chunks), 0), 1

  def extend(self, turn, chunks, images, **kw):
    del images, kw
    return self._emit(len(chunks), turn), turn + 1


@dataclasses.dataclass(frozen=True)
class WarmupData:
  """How warm-up rows are drawn."""

  box_grid: int = 3                      # random boxes: one cell of a box_grid x box_grid grid
  min_coverage: float = engine_lib.TARGET_HIT_COVERAGE  # a crop "shows" the target from this share
  mix: tuple[float, float, float] = (1.0, 1.0, 1.0)  # weights of format / close-up / single-turn rows
  label: str = "key region"              # the JSON label of every box
  close_up_min_side: float = 3.0         # smallest close-up box, in target sides (largest: a grid cell)
  single_turn_view: str = "full"         # image of single-turn rows: "full" (the original) or "close_up"

  def __post_init__(self):
    if self.single_turn_view not in ("full", "close_up"):
      raise ValueError(f"single_turn_view must be 'full' or 'close_up', got {self.single_turn_view!r}")


def grid_cells(sample: Mapping[str, Any], in_size: tuple[int, int], cells: int
               ) -> tuple[list[tuple[int, int, int, int]], list[float]]:
  """The `cells` x `cells` grid boxes of the model-input image (`in_size`) and the share of the
  sample's target each one shows (0 without a target_box)."""
  boxes = grid_boxes(*in_size, cells)
  target = sample.get(schema.TARGET_BOX)
  orig = sample["image"].size
  return boxes, [crop_lib.target_coverage(b, in_size, orig, target) if target is not None else 0.0 for b in boxes]


def _row_plan(sample: Mapping[str, Any], kind: RowKind, cfg: WarmupData, image_cfg: ImageProcessorConfig,
              rng: np.random.Generator) -> tuple[tuple[int, int, int, int] | None, bool, bool]:
  """(box, train turn 1, train the answer) of one row; for a single-turn row the box is the close-up
  view (input pixels) its image is cut to, or None for the full image."""
  if kind == RowKind.SINGLE_TURN and cfg.single_turn_view == "full":
    return None, False, True
  orig = sample["image"].size
  in_size = input_size(orig, image_cfg)
  boxes, cover = grid_cells(sample, in_size, cfg.box_grid)
  target = sample.get(schema.TARGET_BOX)
  if kind == RowKind.FORMAT:
    i = int(rng.integers(len(boxes)))
    return boxes[i], True, cover[i] >= cfg.min_coverage
  if target is None:
    raise ValueError(f"sample {sample.get('id')!r}: close-up rows need a target_box")
  # A single-turn view is only cut from the original, so it may be tighter than a box the model could
  # give (parse.MIN_BOX_SIDE): the detail then fills more of the image.
  min_px = 8 if kind == RowKind.SINGLE_TURN else parse_lib.MIN_BOX_SIDE + 1
  return _close_up_box(target, orig, in_size, boxes[0], cfg.close_up_min_side, rng, min_px), False, True


def _close_up_sample(sample: Mapping[str, Any], box_in, image_cfg: ImageProcessorConfig) -> dict[str, Any]:
  """`sample` with its image cut to the close-up `box_in` (input pixels) and the target box moved along."""
  orig = sample["image"].size
  in_size = input_size(orig, image_cfg)
  x1, y1, _, _ = crop_lib.map_box_to_original(box_in, in_size, orig)
  out = dict(sample)
  out["image"] = crop_lib.crop_original(sample["image"], box_in, in_size)
  t = sample[schema.TARGET_BOX]
  out[schema.TARGET_BOX] = [t[0] - x1, t[1] - y1, t[2] - x1, t[3] - y1]
  return out


def _close_up_box(target, orig, in_size, cell, min_side: float, rng: np.random.Generator,
                  min_px: int = parse_lib.MIN_BOX_SIDE + 1):
  """A square box (input pixels) holding the whole target, its side drawn between `min_side` x the
  target's and a grid cell's: a curriculum from large, easy views of the detail to the cell-sized crops
  the grounding turn produces."""
  w_in, h_in = in_size
  sx, sy = in_size[0] / orig[0], in_size[1] / orig[1]
  tx1, ty1 = int(target[0] * sx), int(target[1] * sy)
  tx2, ty2 = int(np.ceil(target[2] * sx)), int(np.ceil(target[3] * sy))
  hi = min(cell[2] - cell[0], cell[3] - cell[1])
  lo = min(hi, max(min_px, int(min_side * max(tx2 - tx1, ty2 - ty1))))
  side = int(rng.integers(lo, hi + 1))
  def start(t1, t2, size):
    a, b = max(0, t2 - side), min(t1, size - side)
    return int(rng.integers(a, b + 1)) if b >= a else max(0, min(t1, size - side))
  x1, y1 = start(tx1, tx2, w_in), start(ty1, ty2, h_in)
  return x1, y1, x1 + side, y1 + side


def build_rows(samples: Sequence[Mapping[str, Any]], kinds: Sequence[RowKind], tokenizer, model_cfg,
               rollout_cfg: engine_lib.RolloutConfig, cfg: WarmupData, rng: np.random.Generator
               ) -> list[traj_lib.Trajectory]:
  """One warm-up conversation per (decoded sample, kind), as trajectories whose `turn_mask` is the
  SFT loss mask."""
  special = special_token_ids(tokenizer)
  out: list[traj_lib.Trajectory | None] = [None] * len(samples)
  for single in (False, True):
    idx = [i for i, k in enumerate(kinds) if (k == RowKind.SINGLE_TURN) == single]
    if not idx:
      continue
    plans = [_row_plan(samples[i], kinds[i], cfg, rollout_cfg.image, rng) for i in idx]
    letters = [samples[i][schema.ANSWER] for i in idx]
    rows = [samples[i] for i in idx]
    if single:  # the plan's box is the view; the conversation has no box
      rows = [r if p[0] is None else _close_up_sample(r, p[0], rollout_cfg.image) for r, p in zip(rows, plans)]
      plans = [(None, False, True)] * len(plans)

    def script(r, turn, plans=plans, letters=letters):
      box = plans[r][0]
      return answer_text(letters[r]) if box is None or turn == 1 else box_text(box, cfg.label)

    mode = engine_lib.RolloutMode.SINGLE_TURN if single else engine_lib.RolloutMode.MGPO
    eng = engine_lib.RolloutEngine(
        ScriptedSampler(model_cfg, tokenizer, script, special.pad, special.im_end), tokenizer,
        dataclasses.replace(rollout_cfg, mode=mode, max_turns=1 if single else 2, num_generations=1))
    result = eng.run(rows, jax.random.key(0))
    for j, (tr, (box, train_box, train_answer)) in enumerate(zip(result.trajectories, plans)):
      if box is not None and not tr.box_valid[0]:
        raise ValueError(f"warm-up box {box} was rejected ({tr.box_reasons[0]}): box_grid too fine")
      mask = tr.turn_mask.copy()
      spans = tr.turn_spans
      if not single:
        s, e = spans[0]
        mask[s:e] *= int(train_box)
      s, e = spans[-1]
      mask[s:e] *= int(train_answer)
      tr.turn_mask = mask
      out[idx[j]] = tr
  return out  # type: ignore[return-value]


def draw_kinds(n: int, cfg: WarmupData, rng: np.random.Generator) -> list[RowKind]:
  p = np.asarray(cfg.mix, np.float64)
  if p.shape != (3,) or (p < 0).any() or p.sum() <= 0:
    raise ValueError(f"WarmupData.mix must be 3 non-negative weights, not all 0; got {cfg.mix}")
  kinds = list(RowKind)
  return [kinds[i] for i in rng.choice(3, size=n, p=p / p.sum())]


def decoded(samples, max_image_pixels: int) -> list[dict[str, Any]]:
  """`samples` with their images decoded (unusable ones skipped, as in training)."""
  decode = pipeline.DecodeImage(max_image_pixels)
  return [d for d in map(decode, samples) if d is not None]
