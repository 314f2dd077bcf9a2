"""Fixtures shared by the tests and the benchmarks (never used by the programs).

  random_train_batch   a host `TrainBatch` with the rollout's structure (groups sharing a prompt, turns,
                       images, masks), random content
  full_rows            a `TrainBatch`'s rows as whole conversations (prefix + continuation), for references
"""

from __future__ import annotations

import numpy as np

from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from mgpo_jax.models.qwen2_5_vl.vision import prepare_vision_inputs
from mgpo_jax.rl.batch import TrainBatch
from mgpo_jax.rollout.trajectory import Trajectory, layout_sizes, to_train_batch


def random_trajectories(model_cfg: Qwen25VLConfig, *, num_prompts: int, samples_per_prompt: int,
                        seq_len: int, num_turns: int = 2, with_images: bool = True,
                        image_grids: tuple[tuple[int, int, int], ...] = ((1, 4, 4), (1, 4, 6), (1, 6, 4)),
                        seed: int = 0) -> list[Trajectory]:
  """Rows b = group b // samples_per_prompt:
    [text <vision_start> <image_pad>*n <vision_end> text]   (the group's prompt: same tokens and image)
    [turn-1 sample ... eos] then per later turn [text <vision_start> <image_pad>*n' <vision_end> text][sample ... eos]
  each row at most `seq_len` tokens, random sampling log-probs on the samples, binary rewards."""
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

  def user_turn():
    ids = list(rng.choice(text_ids, size=int(rng.integers(2, 5))))
    pixels = grid = None
    if with_images:
      grid = image_grids[int(rng.integers(len(image_grids)))]
      pixels = rng.standard_normal((int(np.prod(grid)), vcfg.patch_dim)).astype(np.float32)
      ids += [model_cfg.vision_start_token_id] + [model_cfg.image_token_id] * (int(np.prod(grid)) // merge)
      ids += [model_cfg.vision_end_token_id]
    return ids + list(rng.choice(text_ids, size=2)), pixels, grid

  out = []
  for p in range(num_prompts):
    prompt = user_turn()
    for j in range(samples_per_prompt):
      ids, mask, spans, pixels, grids = [], [], [], [], []
      for k in range(num_turns):
        text, px, g = prompt if k == 0 else user_turn()
        n = int(rng.integers(2, budget // num_turns + 1))
        sample = list(rng.choice(text_ids, size=n - 1)) + [eos]
        spans.append((len(ids) + len(text), len(ids) + len(text) + n))
        ids += text + sample
        mask += [0] * len(text) + [1] * n
        if px is not None:
          pixels.append(px)
          grids.append(np.asarray(g))
      mask = np.asarray(mask, np.int32)
      logp = np.where(mask > 0, -rng.uniform(0.05, 3.0, size=len(ids)), 0.0).astype(np.float32)
      out.append(Trajectory(token_ids=np.asarray(ids, np.int32), turn_mask=mask, logprobs=logp, turn_spans=spans,
                            images=[], pixel_values=pixels, image_grids=grids, texts=[""] * num_turns,
                            box_valid=[bool(rng.integers(0, 2))], reward=float(rng.integers(0, 2)),
                            sample_index=p, generation_index=j))
  return out


def random_train_batch(model_cfg: Qwen25VLConfig, *, num_prompts: int, samples_per_prompt: int,
                       seq_len: int, num_turns: int = 2, with_images: bool = True,
                       image_grids: tuple[tuple[int, int, int], ...] = ((1, 4, 4), (1, 4, 6), (1, 6, 4)),
                       num_padding_rows: int = 0, seed: int = 0) -> TrainBatch:
  """A host (numpy) `TrainBatch` of `random_trajectories` (group b // samples_per_prompt) and
  `num_padding_rows` all-zero rows (group id -1) at the end. Continuations are padded to `seq_len`,
  prefixes to the next multiple of 8 of the longest, patches to what the images need."""
  trajs = random_trajectories(model_cfg, num_prompts=num_prompts, samples_per_prompt=samples_per_prompt,
                              seq_len=seq_len, num_turns=num_turns, with_images=with_images,
                              image_grids=image_grids, seed=seed)
  sizes = layout_sizes(trajs, model_cfg.vision, model_cfg.image_token_id)
  max_patches = max(int(np.prod(g)) for g in image_grids)
  return to_train_batch(
      trajs, [t.sample_index for t in trajs], seq_bucket=seq_len,
      patch_bucket=max(num_turns - 1, 1) * max_patches, max_images=max(num_turns - 1, 1), pad_id=0,
      vision_cfg=model_cfg.vision, max_turns=num_turns, num_rows=len(trajs) + num_padding_rows,
      image_token_id=model_cfg.image_token_id, prefix_bucket=-(-max(sizes.prefix_tokens, 1) // 8) * 8,
      prefix_patch_bucket=max_patches, prefix_max_images=1)


def raw_pixels(vision_row, grid_row, vcfg: VisionConfig):
  """One row of batched vision inputs back to HF's pixel_values order: ([n, C] pixels, [k, 3] grids)."""
  grid_row = np.asarray(grid_row)
  grid = grid_row[grid_row[:, 0] > 0]
  n = int(np.prod(grid, axis=1).sum())
  perm = prepare_vision_inputs(np.tile(np.arange(n, dtype=np.float32)[:, None], (1, vcfg.patch_dim)),
                               grid, vcfg).pixels_PC[:, 0].astype(int)
  raw = np.empty((n, vcfg.patch_dim), np.float32)
  raw[perm] = np.asarray(vision_row.pixels_PC)[:n]
  return raw, grid


def full_rows(batch: TrainBatch, vcfg: VisionConfig) -> dict:
  """Each row as its whole conversation, [B, S + T] (prefix's real tokens, then the continuation, then
  padding), with `offset_B` (where the continuation starts) and per row its images in HF order
  (`pixels` [n, C] or None, `grids` [k, 3])."""
  index = np.asarray(batch.prefix_index_B)
  pmask = np.asarray(batch.prefix_mask_GS)[index]
  pids = np.asarray(batch.prefix_ids_GS)[index]
  B, T = np.shape(batch.input_ids_BT)
  S = pmask.shape[1]
  out = {k: np.zeros((B, S + T), dt) for k, dt in
         (("ids_BT", np.int32), ("mask_BT", np.int32), ("loss_mask_BT", np.float32), ("old_logp_BT", np.float32))}
  offset = pmask.sum(axis=1).astype(int)
  pixels, grids = [], []
  for b in range(B):
    n = offset[b]
    out["ids_BT"][b, :n], out["mask_BT"][b, :n] = pids[b, :n], 1
    for k, src in (("ids_BT", batch.input_ids_BT), ("mask_BT", batch.mask_BT),
                   ("loss_mask_BT", batch.loss_mask_BT), ("old_logp_BT", batch.old_logp_BT)):
      out[k][b, n:n + T] = np.asarray(src)[b]
    px, gr = [], []
    for vision, grid, i in ((batch.prefix_vision, batch.prefix_grid_GI3, index[b]),
                            (batch.vision, batch.image_grid_BI3, b)):
      if vision is not None and np.asarray(grid)[i, 0, 0] > 0:
        p, g = raw_pixels(type(vision)(*[np.asarray(x)[i] for x in
                                         (vision.pixels_PC, vision.pos_P2, vision.window_seg_P,
                                          vision.image_seg_P, vision.restore_U)]), np.asarray(grid)[i], vcfg)
        px.append(p)
        gr.append(g)
    pixels.append(np.concatenate(px) if px else None)
    grids.append(np.concatenate(gr) if gr else None)
  out.update(offset_B=offset, pixels=pixels, grids=grids)
  return out


def to_continuation(x_BF: np.ndarray, batch: TrainBatch, offset_B: np.ndarray) -> np.ndarray:
  """A [B, S + T] array in `full_rows`' layout -> the batch's continuation layout [B, T]."""
  T = np.shape(batch.input_ids_BT)[1]
  return np.stack([x_BF[b, o:o + T] for b, o in enumerate(offset_B)])
