"""One sampled MGPO conversation, and the batching of many into the learner's `TrainBatch`.

Token layout of a 2-turn trajectory (compacted, exactly what the sampler's KV cache held, minus holes):

  [system, user 1, <img pads>, asst hdr][turn-1 sample <|im_end|>][\\n user 2, <crop pads>, asst hdr][turn 2 ...]
  turn_mask:  0 ...                      1 ...                       0 ...                            1 ...
  logprobs:   0 ...                      sampling log-probs          0 ...                            log-probs

The closing `<|im_end|>` of a turn is in the turn mask whether the model sampled it or the rollout
appended it after cutting the turn at the end of its JSON block (`forced_close`); a forced one carries the
model's log-prob of `<|im_end|>` at that position (see `engine`). A final turn cut by the token limit has
no closing token.
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


def to_train_batch(trajectories: Sequence[Trajectory], group_ids: Sequence[int], *, seq_bucket: int,
                   patch_bucket: int, max_images: int, pad_id: int, vision_cfg: VisionConfig, max_turns: int,
                   num_rows: int | None = None, image_token_id: int | None = None) -> TrainBatch:
  """Right-pads trajectories into a static-shape `TrainBatch` (host numpy arrays).

  Args:
    trajectories: the rows.
    group_ids: prompt index of each row (rows with the same id share the advantage baseline).
    seq_bucket: padded sequence length T; a longer trajectory is an error.
    patch_bucket: vision patches per row P (all images of a row together).
    max_images: images per row I.
    pad_id: token id written on padding.
    vision_cfg: the model's vision config (window bookkeeping).
    max_turns: K of `turn_lengths_BK`.
    num_rows: pad the batch to this many rows (group id -1, all masks 0); default len(trajectories).
    image_token_id: if given, check that each row's <|image_pad|> tokens match its images (a sampled
      <|image_pad|> would otherwise silently shift the image features; the rollout bans sampling it).
  """
  n = len(trajectories)
  B = n if num_rows is None else num_rows
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
  pvs, grids = [None] * B, [None] * B
  for b, (tr, g) in enumerate(zip(trajectories, group_ids)):
    T = len(tr.token_ids)
    if T > seq_bucket:
      raise ValueError(f"trajectory {b} has {T} tokens, more than seq_bucket={seq_bucket}")
    if tr.num_turns > max_turns:
      raise ValueError(f"trajectory {b} has {tr.num_turns} turns, more than max_turns={max_turns}")
    ids[b, :T] = tr.token_ids
    mask[b, :T] = 1
    loss_mask[b, :T] = tr.turn_mask
    old_logp[b, :T] = np.where(tr.turn_mask > 0, tr.logprobs, 0.0)
    rewards[b] = tr.reward
    groups[b] = g
    valid_box[b] = float(bool(tr.box_valid) and tr.box_valid[0])
    for k, (s, e) in enumerate(tr.turn_spans):
      turn_lengths[b, k] = int(tr.turn_mask[s:e].sum())
    if image_token_id is not None:
      n_pad = int((tr.token_ids == image_token_id).sum())
      n_feat = sum(int(np.prod(g)) for g in tr.image_grids) // vision_cfg.merge_unit
      if n_pad != n_feat:
        raise ValueError(f"trajectory {b}: {n_pad} <|image_pad|> tokens but its images give {n_feat} features")
    if tr.pixel_values:
      pvs[b] = np.concatenate(tr.pixel_values)
      grids[b] = np.stack([np.asarray(x).reshape(3) for x in tr.image_grids])
  vision = None
  image_grid = np.zeros((B, max_images, 3), np.int32)
  if any(g is not None for g in grids):
    vision, image_grid = prepare_vision_batch(pvs, grids, vision_cfg, pad_to=patch_bucket, max_images=max_images)
  return TrainBatch(input_ids_BT=ids, mask_BT=mask, loss_mask_BT=loss_mask, old_logp_BT=old_logp,
                    rewards_B=rewards, group_ids_B=groups, vision=vision, image_grid_BI3=image_grid.astype(np.int32),
                    valid_box_B=valid_box, turn_lengths_BK=turn_lengths)
