"""Fixtures shared by the tests and the benchmarks (never used by the programs).

  random_train_batch   a host `TrainBatch` with the rollout's structure (turns, images, masks), random content
"""

from __future__ import annotations

import numpy as np

from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.models.qwen2_5_vl.vision import prepare_vision_batch
from mgpo_jax.rl.batch import TrainBatch


def random_train_batch(model_cfg: Qwen25VLConfig, *, num_prompts: int, samples_per_prompt: int,
                       seq_len: int, num_turns: int = 2, with_images: bool = True,
                       image_grids: tuple[tuple[int, int, int], ...] = ((1, 4, 4), (1, 4, 6), (1, 6, 4)),
                       num_padding_rows: int = 0, seed: int = 0) -> TrainBatch:
  """A host (numpy) `TrainBatch` with the rollout's structure, random content.

  Row b (group b // samples_per_prompt):
    [text <vision_start> <image_pad>*n <vision_end> text][turn-1 sample ... eos]
    [text <vision_start> <image_pad>*n' <vision_end> text][turn-2 sample ... eos] ... [pad]
  with the loss mask on the samples only, random sampling log-probs on them, binary rewards, and
  `num_padding_rows` all-zero rows (group id -1) at the end.
  """
  rng = np.random.default_rng(seed)
  vcfg = model_cfg.vision
  special = {model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id,
             model_cfg.vision_end_token_id}
  eos = model_cfg.eos_token_id
  eos = eos[0] if isinstance(eos, tuple) else eos
  if eos is None or not 0 <= eos < model_cfg.vocab_size:
    raise ValueError(f"model_cfg.eos_token_id={model_cfg.eos_token_id} is not a token of the vocabulary.")
  special.add(eos)
  text_ids = np.array([i for i in range(1, min(model_cfg.vocab_size, 4096)) if i not in special])
  merge = vcfg.merge_unit
  max_img_tokens = max(t * h * w for t, h, w in image_grids) // merge if with_images else 0
  fixed = num_turns * (4 + max_img_tokens + 2 + 2)  # per turn: text, image block, text
  budget = seq_len - fixed
  if budget < 2 * num_turns:
    raise ValueError(f"seq_len={seq_len} is too short for {num_turns} turns with images of up to "
                     f"{max_img_tokens} tokens (needs > {fixed + 2 * num_turns}).")

  R = num_prompts * samples_per_prompt + num_padding_rows
  ids = np.zeros((R, seq_len), np.int32)
  mask = np.zeros((R, seq_len), np.int32)
  loss_mask = np.zeros((R, seq_len), np.float32)
  turn_lengths = np.zeros((R, num_turns), np.int32)
  pixels, grids = [], []
  for b in range(num_prompts * samples_per_prompt):
    seq, lmask, row_pixels, row_grids = [], [], [], []
    for k in range(num_turns):
      prompt = list(rng.choice(text_ids, size=int(rng.integers(2, 5))))
      if with_images:
        g = image_grids[int(rng.integers(len(image_grids)))]
        row_grids.append(g)
        row_pixels.append(rng.standard_normal((int(np.prod(g)), vcfg.patch_dim)).astype(np.float32))
        prompt += [model_cfg.vision_start_token_id] + [model_cfg.image_token_id] * (int(np.prod(g)) // merge)
        prompt += [model_cfg.vision_end_token_id]
      prompt += list(rng.choice(text_ids, size=2))
      n = int(rng.integers(2, budget // num_turns + 1))
      turn_lengths[b, k] = n
      sample = list(rng.choice(text_ids, size=n - 1)) + [eos]
      seq += prompt + sample
      lmask += [0.0] * len(prompt) + [1.0] * n
    ids[b, :len(seq)], mask[b, :len(seq)], loss_mask[b, :len(seq)] = seq, 1, lmask
    pixels.append(np.concatenate(row_pixels) if row_pixels else None)
    grids.append(np.asarray(row_grids) if row_grids else None)
  pixels += [None] * num_padding_rows
  grids += [None] * num_padding_rows

  vision = None
  grid_BI3 = np.zeros((R, max(num_turns, 1), 3), np.int32)
  if with_images:
    pad_to = num_turns * max(int(np.prod(g)) for g in image_grids)
    vision, grid_BI3 = prepare_vision_batch(pixels, grids, vcfg, pad_to=pad_to, max_images=num_turns)
  group_ids = np.full(R, -1, np.int32)
  group_ids[:num_prompts * samples_per_prompt] = np.arange(num_prompts * samples_per_prompt) // samples_per_prompt
  real = group_ids >= 0
  old_logp = np.where(loss_mask > 0, -rng.uniform(0.05, 3.0, size=ids.shape), 0.0).astype(np.float32)
  return TrainBatch(
      input_ids_BT=ids, mask_BT=mask, loss_mask_BT=loss_mask, old_logp_BT=old_logp,
      rewards_B=np.where(real, rng.integers(0, 2, size=R), 0).astype(np.float32),
      group_ids_B=group_ids, vision=vision, image_grid_BI3=grid_BI3.astype(np.int32),
      valid_box_B=np.where(real, rng.integers(0, 2, size=R), 0).astype(np.float32),
      turn_lengths_BK=turn_lengths)
