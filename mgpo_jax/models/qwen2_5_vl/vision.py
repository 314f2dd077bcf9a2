"""Qwen2.5-VL vision tower: patch embedding, window/full attention blocks, patch merger.

The data-dependent bookkeeping (2-D rotary positions, the window permutation, which patches may attend
to which) depends only on `image_grid_thw`, which the host knows. `prepare_vision_inputs` computes it in
numpy and pads everything to a static patch count, so the jitted tower sees fixed shapes:

  patches (HF order, 2x2 merge blocks)  --permute by window-->  blocks  --merger-->  --inverse perm-->
  features in HF order (one row per <|image_pad|> token)

Window attention and "attend only within one image/frame" are both expressed as segment ids.

A batch of images in transformers' flattened layout (`pixel_values` [total patches, 1176], one grid per
image) is not run as one long sequence: a full-attention block would then score every patch against every
patch of the batch, (total)^2, although only the patches of the same image count. `prepare_vision_images`
packs whole images, in order, into rows of a fixed capacity (the largest image) and the tower runs per
row (vmapped), so a full block costs at most rows x capacity^2 <= 2 x total x capacity:

  images  [a a a a a a][b b][c c c][d d d d d d]       (flattened, HF order)
  rows    row 0: a a a a a a          row 1: b b c c c .     row 2: d d d d d d
  features: row by row, padding dropped  ->  a.. b.. c.. d..  (HF order again)
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgpo_jax.models.qwen2_5_vl.config import VisionConfig
from mgpo_jax.models.qwen2_5_vl.layers import apply_rope, attention, param, rms_norm

VISION_NORM_EPS = 1e-6  # fixed in HF, independent of the text rms_norm_eps


@flax.struct.dataclass
class VisionInputs:
  """Static-shape inputs of the vision tower (P = padded patches, U = P // merge_unit)."""
  pixels_PC: jax.Array      # patch rows already in window order
  pos_P2: jax.Array         # (row, col) of each patch in its image, window order
  window_seg_P: jax.Array   # window id; -1 on padding
  image_seg_P: jax.Array    # (image, frame) id; -1 on padding
  restore_U: jax.Array      # merged tokens: window order -> HF order (argsort of the window index)
  # Batched layouts only ([R, P, ...]). False: row r holds the images of input row r (`prepare_vision_batch`).
  # True: rows are packs of whole images (`prepare_vision_images`); their features, row after row with
  # each row's padding dropped, replace the <|image_pad|> tokens in flattened (batch, sequence) order.
  flat_order: bool = flax.struct.field(pytree_node=False, default=False)


def num_patches(grid_thw) -> int:
  g = np.asarray(grid_thw).reshape(-1, 3)
  return int(np.prod(g, axis=1).sum())


def prepare_vision_inputs(pixel_values, grid_thw, cfg: VisionConfig, pad_to: int | None = None) -> VisionInputs:
  """Host-side (numpy) window bookkeeping, mirroring transformers' `get_vision_window_index`."""
  grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
  pixels = np.asarray(pixel_values)
  m, unit = cfg.spatial_merge_size, cfg.merge_unit
  total = num_patches(grid)
  if pixels.ndim != 2 or pixels.shape != (total, cfg.patch_dim):
    raise ValueError(f"pixel_values has shape {pixels.shape}, but image_grid_thw {grid.tolist()} needs "
                     f"({total}, {cfg.patch_dim})")
  if (grid[:, 1:] % m).any():
    raise ValueError(f"image_grid_thw {grid.tolist()}: h and w must be multiples of spatial_merge_size={m}")
  win = cfg.window_size // m // cfg.patch_size  # window side in merged tokens (4 for 112 px)

  pos, window_index, window_seg_u, image_seg = [], [], [], []
  unit_offset = window_offset = 0
  for i, (t, h, w) in enumerate(grid.tolist()):
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    blocks = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
    pos.append(np.tile(np.stack([blocks(hh), blocks(ww)], -1), (t, 1)))
    gh, gw = h // m, w // m
    nwh, nww = -(-gh // win), -(-gw // win)
    idx = np.arange(t * gh * gw).reshape(t, gh, gw)
    # Window id of each merged token, enumerated frame-major then window row-major (as HF pads and permutes).
    wid = ((np.arange(t)[:, None, None] * nwh + np.arange(gh)[None, :, None] // win) * nww
           + np.arange(gw)[None, None, :] // win)
    order = np.lexsort((idx.reshape(-1), wid.reshape(-1)))  # stable sort by window
    window_index.append(idx.reshape(-1)[order] + unit_offset)
    _, dense_wid = np.unique(wid.reshape(-1)[order], return_inverse=True)
    window_seg_u.append(dense_wid + window_offset)
    window_offset += int(dense_wid.max()) + 1
    unit_offset += t * gh * gw
    image_seg.append(np.repeat(np.arange(t) + _frame_base(grid, i), h * w))

  window_index = np.concatenate(window_index)
  perm_P = (window_index[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
  pixels = pixels[perm_P]
  pos_P2 = np.concatenate(pos)[perm_P]
  image_seg_P = np.concatenate(image_seg)[perm_P]
  window_seg_P = np.repeat(np.concatenate(window_seg_u), unit)
  restore_U = np.argsort(window_index)

  pad = 0 if pad_to is None else pad_to - total
  if pad < 0 or pad % unit:
    raise ValueError(f"pad_to={pad_to} must be >= {total} patches and a multiple of {unit}")
  if pad:
    pixels = np.concatenate([pixels, np.zeros((pad, pixels.shape[1]), pixels.dtype)])
    pos_P2 = np.concatenate([pos_P2, np.zeros((pad, 2), pos_P2.dtype)])
    window_seg_P = np.concatenate([window_seg_P, np.full(pad, -1)])
    image_seg_P = np.concatenate([image_seg_P, np.full(pad, -1)])
    restore_U = np.concatenate([restore_U, np.arange(total // unit, (total + pad) // unit)])
  return VisionInputs(
      pixels_PC=pixels.astype(np.float32),
      pos_P2=pos_P2.astype(np.int32),
      window_seg_P=window_seg_P.astype(np.int32),
      image_seg_P=image_seg_P.astype(np.int32),
      restore_U=restore_U.astype(np.int32))


def prepare_vision_batch(pixel_values_B, grid_thw_B, cfg: VisionConfig, pad_to: int,
                         max_images: int) -> tuple[VisionInputs, np.ndarray]:
  """Per-row vision inputs stacked on a leading batch axis, plus grids padded to [B, max_images, 3].

  `pixel_values_B[b]` / `grid_thw_B[b]` hold the images of row b in their order in the row (None or an
  empty grid for a row without images). Every row is padded to `pad_to` patches (a static bucket).
  """
  rows, grids = [], np.zeros((len(grid_thw_B), max_images, 3), np.int32)
  for b, (pv, g) in enumerate(zip(pixel_values_B, grid_thw_B)):
    g = np.zeros((0, 3), np.int64) if g is None else np.asarray(g, np.int64).reshape(-1, 3)
    if len(g) > max_images:
      raise ValueError(f"row {b} has {len(g)} images, more than max_images={max_images}")
    grids[b, :len(g)] = g
    if len(g):
      rows.append(prepare_vision_inputs(pv, g, cfg, pad_to))
    else:
      rows.append(VisionInputs(
          pixels_PC=np.zeros((pad_to, cfg.patch_dim), np.float32), pos_P2=np.zeros((pad_to, 2), np.int32),
          window_seg_P=np.full(pad_to, -1, np.int32), image_seg_P=np.full(pad_to, -1, np.int32),
          restore_U=np.arange(pad_to // cfg.merge_unit, dtype=np.int32)))
  return jax.tree.map(lambda *xs: np.stack(xs), *rows), grids


def pad_patches(vis: VisionInputs, pad_to: int) -> VisionInputs:
  """Batched-layout `vis` [R, P, ...] with every row padded to `pad_to` >= P patches (jit-friendly), the way
  `prepare_vision_inputs(pad_to=...)` pads: the new patches belong to no window and no image (-1), so no
  real patch attends to them, and their merged units come after the old ones (`restore_U`), so a row's
  first P // merge_unit output features are those of the unpadded row."""
  P, U = vis.pixels_PC.shape[1], vis.restore_U.shape[1]
  unit = P // U
  if vis.flat_order or vis.pixels_PC.ndim != 3 or pad_to < P or pad_to % unit:
    raise ValueError(f"pad_patches takes per-row batched vision inputs [R, P, ...] and pad_to >= P={P}, a "
                     f"multiple of {unit}; got pad_to={pad_to}")
  pad = pad_to - P
  if pad == 0:
    return vis
  R = vis.pixels_PC.shape[0]
  fill = lambda x, value: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=value)
  new_units = jnp.broadcast_to(jnp.arange(U, pad_to // unit, dtype=vis.restore_U.dtype), (R, pad // unit))
  return vis.replace(pixels_PC=fill(vis.pixels_PC, 0), pos_P2=fill(vis.pos_P2, 0),
                     window_seg_P=fill(vis.window_seg_P, -1), image_seg_P=fill(vis.image_seg_P, -1),
                     restore_U=jnp.concatenate([vis.restore_U, new_units], axis=1))


def pack_images(grid_thw, capacity: int) -> list[list[int]]:
  """Image indices in rows of at most `capacity` patches, in order (next fit: a row closes when the next
  image does not fit), so reading the rows one after another gives the images in their original order."""
  sizes = np.prod(np.asarray(grid_thw, np.int64).reshape(-1, 3), axis=1)
  if len(sizes) and sizes.max() > capacity:
    raise ValueError(f"an image has {int(sizes.max())} patches, more than the row capacity {capacity}")
  rows, used = [], capacity + 1
  for i, n in enumerate(sizes.tolist()):
    if used + n > capacity:
      rows.append([])
      used = 0
    rows[-1].append(i)
    used += n
  return rows


def prepare_vision_images(pixel_values, grid_thw, cfg: VisionConfig, capacity: int | None = None,
                          num_rows: int | None = None) -> VisionInputs:
  """transformers' flattened layout (all images' patches concatenated) regrouped into rows of whole images.

  Each row holds consecutive images (`pack_images`) padded to `capacity` patches (default: the largest
  image), so attention is paid per row, never across the whole batch. `num_rows` pads with empty rows (a
  static bucket). The result has `flat_order=True`: the model takes the features row after row.
  """
  grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
  pixels = np.asarray(pixel_values)
  total = num_patches(grid)
  if pixels.ndim != 2 or pixels.shape != (total, cfg.patch_dim):
    raise ValueError(f"pixel_values has shape {pixels.shape}, but image_grid_thw {grid.tolist()} needs "
                     f"({total}, {cfg.patch_dim})")
  sizes = np.prod(grid, axis=1)
  capacity = int(sizes.max()) if capacity is None else capacity
  rows = pack_images(grid, capacity)
  if num_rows is not None and num_rows < len(rows):
    raise ValueError(f"{len(grid)} images need {len(rows)} rows of {capacity} patches, more than num_rows={num_rows}")
  starts = np.concatenate([[0], np.cumsum(sizes)])
  pvs = [pixels[starts[r[0]]:starts[r[-1] + 1]] for r in rows]
  pvs += [None] * ((num_rows or len(rows)) - len(rows))
  vision, _ = prepare_vision_batch(pvs, [grid[r] for r in rows] + [None] * (len(pvs) - len(rows)), cfg,
                                   pad_to=capacity, max_images=max([len(r) for r in rows], default=1))
  return vision.replace(flat_order=True)


def _frame_base(grid: np.ndarray, i: int) -> int:
  """Global id of the first frame of image i (each frame is its own full-attention segment)."""
  return int(grid[:i, 0].sum())


ATTENTION_CHUNK = 512  # query patches per attention chunk


def chunked_attention(q_PNH, k_PNH, v_PNH, seg_P, scale: float, *, band: int | None = None,
                      chunk: int = ATTENTION_CHUNK) -> jax.Array:
  """Attention where patch i sees patch j iff seg[i] == seg[j], one chunk of queries at a time.

  Never builds the [P, P] score matrix: a chunk of C queries scores against all P keys (full
  blocks: segments = images) or, with `band`, only against the keys within `band` positions of the
  chunk (window blocks: segments are contiguous runs of at most `band` patches), i.e. [C, C + 2 band].
  Each chunk is rematerialised in the backward pass, so its scores are never kept for all chunks.
  """
  P, N, H = q_PNH.shape
  if P <= chunk:  # one chunk: the plain masked attention is the same computation, and cheaper
    mask_PP = seg_P[:, None] == seg_P[None, :]
    return attention(q_PNH[None], k_PNH[None], v_PNH[None], mask_PP[None], scale)[0]
  C = chunk
  num_chunks = -(-P // C)
  extra = num_chunks * C - P
  q_PNH = jnp.pad(q_PNH, ((0, extra), (0, 0), (0, 0)))
  seg_q = jnp.pad(seg_P, (0, extra), constant_values=-2)  # padded queries see nothing; dropped below
  if band is not None:  # pad keys so that every chunk's key window is in range
    k_PNH, v_PNH = (jnp.pad(x, ((band, band + extra), (0, 0), (0, 0))) for x in (k_PNH, v_PNH))
    seg_k = jnp.pad(seg_P, (band, band + extra), constant_values=-3)
  else:
    seg_k = seg_P

  def one(c):
    q_CNH = jax.lax.dynamic_slice_in_dim(q_PNH, c * C, C)
    sq_C = jax.lax.dynamic_slice_in_dim(seg_q, c * C, C)
    if band is None:
      k_SNH, v_SNH, sk_S = k_PNH, v_PNH, seg_k
    else:  # padded index c*C is original index c*C - band
      k_SNH, v_SNH, sk_S = (jax.lax.dynamic_slice_in_dim(x, c * C, C + 2 * band) for x in (k_PNH, v_PNH, seg_k))
    mask_CS = sq_C[:, None] == sk_S[None, :]
    return attention(q_CNH[None], k_SNH[None], v_SNH[None], mask_CS[None], scale)[0]

  out = jax.lax.map(jax.checkpoint(one), jnp.arange(num_chunks))
  return out.reshape(num_chunks * C, N, H)[:P]


class VisionTower(nnx.Module):
  """Stacked vision blocks run with one `lax.scan`; parameters carry logical sharding axes."""

  def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
    self.cfg = cfg
    L, D, F, N, Hd = cfg.depth, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
    Dm = D * cfg.merge_unit
    p = lambda shape, axes, **kw: param(rngs, shape, axes, dtype, **kw)
    self.patch_embed = p((cfg.patch_dim, D), ("patch", "embed"))
    self.norm1 = p((L, D), ("layers", "norm"), init="ones")
    self.qkv = p((L, D, 3, N, Hd), ("layers", "embed", "qkv", "heads", "head_dim"))
    self.qkv_bias = p((L, 3, N, Hd), ("layers", "qkv", "heads", "head_dim"), init="zeros")
    self.proj = p((L, N, Hd, D), ("layers", "heads", "head_dim", "embed"))
    self.proj_bias = p((L, D), ("layers", "norm"), init="zeros")
    self.norm2 = p((L, D), ("layers", "norm"), init="ones")
    self.gate = p((L, D, F), ("layers", "embed", "mlp"))
    self.gate_bias = p((L, F), ("layers", "mlp"), init="zeros")
    self.up = p((L, D, F), ("layers", "embed", "mlp"))
    self.up_bias = p((L, F), ("layers", "mlp"), init="zeros")
    self.down = p((L, F, D), ("layers", "mlp", "embed"))
    self.down_bias = p((L, D), ("layers", "norm"), init="zeros")
    self.merger_norm = p((D,), ("norm",), init="ones")
    self.merger_fc1 = p((Dm, Dm), ("mlp", "embed"))
    self.merger_fc1_bias = p((Dm,), ("norm",), init="zeros")
    self.merger_fc2 = p((Dm, cfg.out_hidden_size), ("mlp", "embed"))
    self.merger_fc2_bias = p((cfg.out_hidden_size,), ("norm",), init="zeros")

  def __call__(self, vis: VisionInputs, remat: bool = False) -> jax.Array:
    """Returns merged features [U, out_hidden_size] in HF order (padding rows at the end).

    `remat`: recompute each block in the backward pass (training at full resolution).
    """
    cfg = self.cfg
    dtype = self.patch_embed[...].dtype
    x_PD = vis.pixels_PC.astype(dtype) @ self.patch_embed[...]

    # 2-D rotary: half of the rotated dims follow the row, half the column.
    quarter = cfg.head_dim // 4
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, 2 * quarter, 2, dtype=jnp.float32) / (2 * quarter)))
    f_P2F = vis.pos_P2.astype(jnp.float32)[:, :, None] * inv_freq
    f_PH = jnp.concatenate([f_P2F[:, 0], f_P2F[:, 1]], -1)
    f_PH = jnp.concatenate([f_PH, f_PH], -1)
    cos, sin = jnp.cos(f_PH)[:, None], jnp.sin(f_PH)[:, None]

    is_full_L = jnp.zeros(cfg.depth, bool).at[jnp.asarray(cfg.fullatt_block_indexes, jnp.int32)].set(True)
    scale = cfg.head_dim ** -0.5
    if x_PD.shape[0] <= ATTENTION_CHUNK:
      # Small inputs: one dense masked attention, the mask picked per block (no `cond`, which would
      # keep XLA from fusing across it).
      window_PP = vis.window_seg_P[:, None] == vis.window_seg_P[None, :]
      full_PP = vis.image_seg_P[:, None] == vis.image_seg_P[None, :]

      def attend(is_full, q, k, v):
        return attention(q[None], k[None], v[None], jnp.where(is_full, full_PP, window_PP)[None], scale)[0]
    else:
      # A window holds at most (window / patch)^2 patches, contiguous in window order.
      band = (cfg.window_size // cfg.patch_size) ** 2
      windowed = lambda q, k, v: chunked_attention(q, k, v, vis.window_seg_P, scale, band=band)
      full = lambda q, k, v: chunked_attention(q, k, v, vis.image_seg_P, scale)
      attend = lambda is_full, q, k, v: jax.lax.cond(is_full, full, windowed, q, k, v)

    layer_params = dict(
        norm1=self.norm1[...], qkv=self.qkv[...], qkv_bias=self.qkv_bias[...], proj=self.proj[...],
        proj_bias=self.proj_bias[...], norm2=self.norm2[...], gate=self.gate[...],
        gate_bias=self.gate_bias[...], up=self.up[...], up_bias=self.up_bias[...],
        down=self.down[...], down_bias=self.down_bias[...])

    def block(x_PD, xs):
      w, is_full = xs
      h = rms_norm(x_PD, w["norm1"], VISION_NORM_EPS)
      qkv_P3NH = jnp.einsum("PD,DQNH->PQNH", h, w["qkv"]) + w["qkv_bias"]
      q, k, v = qkv_P3NH[:, 0], qkv_P3NH[:, 1], qkv_P3NH[:, 2]
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
      o_PNH = attend(is_full, q, k, v)
      x_PD = x_PD + jnp.einsum("PNH,NHD->PD", o_PNH, w["proj"]) + w["proj_bias"]
      h = rms_norm(x_PD, w["norm2"], VISION_NORM_EPS)
      g = jax.nn.silu(h @ w["gate"] + w["gate_bias"])
      x_PD = x_PD + (g * (h @ w["up"] + w["up_bias"])) @ w["down"] + w["down_bias"]
      return x_PD, None

    if remat:
      block = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
    x_PD, _ = jax.lax.scan(block, x_PD, (layer_params, is_full_L))
    h = rms_norm(x_PD, self.merger_norm[...], VISION_NORM_EPS)
    h_UM = h.reshape(-1, cfg.merge_unit * cfg.hidden_size)
    h_UM = jax.nn.gelu(h_UM @ self.merger_fc1[...] + self.merger_fc1_bias[...], approximate=False)
    out_UO = h_UM @ self.merger_fc2[...] + self.merger_fc2_bias[...]
    return out_UO[vis.restore_U]
