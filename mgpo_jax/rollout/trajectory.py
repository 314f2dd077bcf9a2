"""One sampled MGPO conversation, and the batching of many into the learner's `TrainBatch`.

Token layout of a 2-turn trajectory (compacted, exactly what the sampler's KV cache held, minus holes):

  [system, user 1, <img pads>, asst hdr][turn-1 sample <|im_end|>][\\n user 2, <crop pads>, asst hdr][turn 2 ...]
  turn_mask:  0 ...                      1 ...                       0 ...                            1 ...
  logprobs:   0 ...                      sampling log-probs          0 ...                            log-probs

The closing `<|im_end|>` of a turn is in the turn mask whether the model sampled it or the rollout
appended it after cutting the turn at the end of its JSON block (`forced_close`); a forced one carries the
model's log-prob of `<|im_end|>` at that position (see `engine`). A final turn cut by the token limit has
no closing token.

`to_train_batch` splits each trajectory at `prefix_length` (its prompt minus the prompt's last token): the
prefix goes to the batch's prefix table, once per distinct prompt (a group's rows share it), the rest is the
row's continuation (layout in `rl.batch`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from mgpo_jax.models.qwen2_5_vl.config import VisionConfig
from mgpo_jax.models.qwen2_5_vl.vision import prepare_vision_batch
from mgpo_jax.rl.batch import TrainBatch


@dataclasses.dataclass
class Trajectory:
  """A sampled conversation (one row of the rollout)."""

  token_ids: np.ndarray                 # int32 [T]: the whole conversation, no padding
  turn_mask: np.ndarray                 # int32 [T]: 1 on sampled tokens and each turn's closing <|im_end|>
  logprobs: np.ndarray                  # float32 [T]: sampling log-prob of token t; 0 where turn_mask is 0
  turn_spans: list[tuple[int, int]]     # [start, end) of each turn's model tokens (incl. its closing token)
  images: list[Image.Image]             # images fed, in order: original, then the crop (or original) per turn
  pixel_values: list[np.ndarray]        # float32 [P_i, 1176] per image
  image_grids: list[np.ndarray]         # int [3] per image
  texts: list[str]                      # the model's text per turn (its tokens without the closing token)
  boxes: list[tuple[int, int, int, int] | None] = dataclasses.field(default_factory=list)  # per grounding turn
  # The box each turn's crop was cut from (None: no crop); the model's box except under the
  # random-crop control (RolloutConfig.random_crop).
  crop_boxes: list[tuple[int, int, int, int] | None] = dataclasses.field(default_factory=list)
  box_valid: list[bool] = dataclasses.field(default_factory=list)
  box_reasons: list[str] = dataclasses.field(default_factory=list)
  stop_reasons: list[int] = dataclasses.field(default_factory=list)  # sampling.StopReason per turn
  forced_close: list[bool] = dataclasses.field(default_factory=list)  # <|im_end|> appended, not sampled
  reward: float = 0.0
  # Analysis only (samples with a target_box): 1.0 if the first box's crop holds >= half of the target.
  target_hit: float | None = None
  sample_index: int = 0
  generation_index: int = 0

  @property
  def num_turns(self) -> int:
    return len(self.turn_spans)

  def turn_tokens(self, k: int) -> np.ndarray:
    """The masked (trained) tokens of turn k."""
    s, e = self.turn_spans[k]
    return self.token_ids[s:e][self.turn_mask[s:e] > 0]


def prefix_length(tr: Trajectory) -> int:
  """Tokens of `tr`'s shared prefix: its prompt (everything before the first model token) minus the
  prompt's last token, which goes to the continuation so that its logits (predicting the first sampled
  token) are computed there (see `rl.batch`)."""
  first = tr.turn_spans[0][0] if tr.turn_spans else len(tr.token_ids)
  sampled = np.flatnonzero(np.asarray(tr.turn_mask) > 0)
  if len(sampled):
    first = min(first, int(sampled[0]))
  return max(first - 1, 0)


def _prefix_images(tr: Trajectory, n_prefix: int, image_token_id: int | None, merge_unit: int) -> int:
  """How many of `tr`'s images have their <|image_pad|> tokens in the first `n_prefix` tokens."""
  if not tr.pixel_values:
    return 0
  if image_token_id is None:
    raise ValueError("to_train_batch needs image_token_id to split a row with images into prefix + continuation")
  pads = int((np.asarray(tr.token_ids[:n_prefix]) == image_token_id).sum())
  ends = np.cumsum([int(np.prod(g)) // merge_unit for g in tr.image_grids])
  k = int(np.searchsorted(ends, pads, side="right")) if pads else 0
  if pads and ends[k - 1] != pads:
    raise ValueError(f"the prefix of {n_prefix} tokens ends inside an image ({pads} <|image_pad|> tokens, images "
                     f"end at {ends.tolist()})")
  return k


@dataclasses.dataclass(frozen=True)
class LayoutSizes:
  """The largest prefix / continuation (tokens, patches, images) of some trajectories: pick buckets >= these."""

  prefix_tokens: int
  prefix_patches: int
  prefix_images: int
  tokens: int
  patches: int
  images: int


def fine_buckets(hi: int, lo: int = 256) -> tuple[int, ...]:
  """(lo, 1.5 lo, 2 lo, 3 lo, 4 lo, ...) up to >= hi: two buckets per octave (padding waste <= 50%, a few
  compiled shapes)."""
  out = [lo]
  while out[-1] < hi:
    out.append(out[-1] * 3 // 2 if out[-1] & (out[-1] - 1) == 0 else out[-1] * 4 // 3)
  return tuple(out)


def layout_sizes(trajectories: Sequence[Trajectory], vision_cfg: VisionConfig,
                 image_token_id: int | None) -> LayoutSizes:
  pt = pp = pi = t = p = i = 0
  for tr in trajectories:
    n = prefix_length(tr)
    k = _prefix_images(tr, n, image_token_id, vision_cfg.merge_unit)
    sizes = [int(np.prod(g)) for g in tr.image_grids]
    pt, pp, pi = max(pt, n), max(pp, sum(sizes[:k])), max(pi, k)
    t, p, i = max(t, len(tr.token_ids) - n), max(p, sum(sizes[k:])), max(i, len(sizes) - k)
  return LayoutSizes(pt, pp, pi, t, p, i)


def to_train_batch(trajectories: Sequence[Trajectory], group_ids: Sequence[int], *, seq_bucket: int,
                   patch_bucket: int, max_images: int, pad_id: int, vision_cfg: VisionConfig, max_turns: int,
                   num_rows: int | None = None, image_token_id: int | None = None,
                   prefix_bucket: int | None = None, prefix_patch_bucket: int | None = None,
                   prefix_max_images: int | None = None) -> TrainBatch:
  """Trajectories -> a static-shape shared-prefix `TrainBatch` (host numpy arrays; layout in `rl.batch`).

  Rows whose prefixes (tokens and prefix images) are identical share one prefix entry; the rows of a
  group (one prompt, `num_generations` samples) always do.

  Args:
    trajectories: the rows.
    group_ids: prompt index of each row (rows with the same id share the advantage baseline).
    seq_bucket: padded continuation length T; a longer continuation is an error.
    patch_bucket: continuation vision patches per row P (all of the row's later images together).
    max_images: continuation images per row I.
    pad_id: token id written on padding.
    vision_cfg: the model's vision config (window bookkeeping).
    max_turns: K of `turn_lengths_BK`.
    num_rows: pad the batch to this many rows (group id -1, all masks 0); default len(trajectories).
    image_token_id: <|image_pad|>; needed to split rows with images. Also checks that each row's
      <|image_pad|> tokens match its images (a sampled <|image_pad|> would otherwise silently shift the
      image features; the rollout bans sampling it).
    prefix_bucket: padded prefix length S (default seq_bucket).
    prefix_patch_bucket: patches per prefix Pp (default patch_bucket).
    prefix_max_images: images per prefix Ip (default max_images).
  """
  n = len(trajectories)
  B = n if num_rows is None else num_rows
  S = seq_bucket if prefix_bucket is None else prefix_bucket
  Pp = patch_bucket if prefix_patch_bucket is None else prefix_patch_bucket
  Ip = max_images if prefix_max_images is None else prefix_max_images
  if len(group_ids) != n:
    raise ValueError(f"{len(group_ids)} group ids for {n} trajectories")
  if B < n:
    raise ValueError(f"num_rows={B} is smaller than the {n} trajectories")
  ids = np.full((B, seq_bucket), pad_id, np.int32)
  mask = np.zeros((B, seq_bucket), np.int32)
  loss_mask = np.zeros((B, seq_bucket), np.float32)
  old_logp = np.zeros((B, seq_bucket), np.float32)
  rewards = np.zeros((B,), np.float32)
  groups = np.full((B,), -1, np.int32)
  valid_box = np.zeros((B,), np.float32)
  turn_lengths = np.zeros((B, max_turns), np.int32)
  prefix_index = np.zeros((B,), np.int32)
  pvs, grids = [None] * B, [None] * B
  table: dict[bytes, int] = {}
  p_ids, p_pvs, p_grids = [], [], []
  for b, (tr, g) in enumerate(zip(trajectories, group_ids)):
    T = len(tr.token_ids)
    if tr.num_turns > max_turns:
      raise ValueError(f"trajectory {b} has {tr.num_turns} turns, more than max_turns={max_turns}")
    if image_token_id is not None:
      n_pad = int((tr.token_ids == image_token_id).sum())
      n_feat = sum(int(np.prod(g)) for g in tr.image_grids) // vision_cfg.merge_unit
      if n_pad != n_feat:
        raise ValueError(f"trajectory {b}: {n_pad} <|image_pad|> tokens but its images give {n_feat} features")
    n_pre = prefix_length(tr)
    k = _prefix_images(tr, n_pre, image_token_id, vision_cfg.merge_unit)
    if n_pre > S:
      raise ValueError(f"trajectory {b} has a {n_pre}-token prefix, more than prefix_bucket={S}")
    if T - n_pre > seq_bucket:
      raise ValueError(f"trajectory {b} has {T - n_pre} continuation tokens, more than seq_bucket={seq_bucket}")
    pre_ids = np.asarray(tr.token_ids[:n_pre], np.int32)
    pre_pv = [np.asarray(x, np.float32) for x in tr.pixel_values[:k]]
    pre_grid = [np.asarray(x).reshape(3).astype(np.int64) for x in tr.image_grids[:k]]
    key = b"|".join([pre_ids.tobytes()] + [x.tobytes() for x in pre_grid] + [x.tobytes() for x in pre_pv])
    if key not in table:
      table[key] = len(p_ids)
      p_ids.append(pre_ids)
      p_pvs.append(np.concatenate(pre_pv) if pre_pv else None)
      p_grids.append(np.stack(pre_grid) if pre_grid else None)
    prefix_index[b] = table[key]
    ids[b, :T - n_pre] = tr.token_ids[n_pre:]
    mask[b, :T - n_pre] = 1
    loss_mask[b, :T - n_pre] = tr.turn_mask[n_pre:]
    old_logp[b, :T - n_pre] = np.where(tr.turn_mask > 0, tr.logprobs, 0.0)[n_pre:]
    if np.any(np.asarray(tr.turn_mask[:n_pre + 1]) > 0):
      raise ValueError(f"trajectory {b}: a sampled token inside the prompt")
    rewards[b] = tr.reward
    groups[b] = g
    valid_box[b] = float(bool(tr.box_valid) and tr.box_valid[0])
    for t, (s, e) in enumerate(tr.turn_spans):
      turn_lengths[b, t] = int(tr.turn_mask[s:e].sum())
    if len(tr.pixel_values) > k:
      pvs[b] = np.concatenate(tr.pixel_values[k:])
      grids[b] = np.stack([np.asarray(x).reshape(3) for x in tr.image_grids[k:]])
  if not p_ids:  # no trajectories: one empty prefix for the padding rows
    p_ids, p_pvs, p_grids = [np.zeros((0,), np.int32)], [None], [None]
  G = len(p_ids)
  prefix_ids = np.full((G, S), pad_id, np.int32)
  prefix_mask = np.zeros((G, S), np.int32)
  for i, x in enumerate(p_ids):
    prefix_ids[i, :len(x)], prefix_mask[i, :len(x)] = x, 1
  vision, image_grid = None, np.zeros((B, max_images, 3), np.int32)
  if any(g is not None for g in grids):
    vision, image_grid = prepare_vision_batch(pvs, grids, vision_cfg, pad_to=patch_bucket, max_images=max_images)
  prefix_vision, prefix_grid = None, np.zeros((G, Ip, 3), np.int32)
  if any(g is not None for g in p_grids):
    prefix_vision, prefix_grid = prepare_vision_batch(p_pvs, p_grids, vision_cfg, pad_to=Pp, max_images=Ip)
  return TrainBatch(prefix_ids_GS=prefix_ids, prefix_mask_GS=prefix_mask, prefix_vision=prefix_vision,
                    prefix_grid_GI3=prefix_grid.astype(np.int32), prefix_index_B=prefix_index,
                    input_ids_BT=ids, mask_BT=mask, loss_mask_BT=loss_mask, old_logp_BT=old_logp,
                    rewards_B=rewards, group_ids_B=groups, vision=vision, image_grid_BI3=image_grid.astype(np.int32),
                    valid_box_B=valid_box, turn_lengths_BK=turn_lengths)
