"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) in Flax NNX.

Decoder layers are stacked on a leading `layers` axis and run with one `lax.scan`: compile time stays flat
in the number of layers (28-80 on the released sizes). Positions are the 3-stream M-RoPE ids of HF's
`get_rope_index`, computed vectorised (jit-friendly) from the token ids, the attention mask and the image
grids.

KV cache layout (one shared write pointer `end`; rows are left padded per chunk):

  slot:   0 ......................... end ............. S
  row 0:  [pad pad prompt0 ... gen0 x x][chunk 2 ...]  free
  row 1:  [prompt1 ......... gen1 gen1 ][chunk 2 ...]  free
          `mask_BS` marks the slots that hold real tokens (holes after an early EOS stay 0).

Positions do not come from slot indices but from `next_pos_B` (the next M-RoPE text position of each row),
so a conversation can be continued chunk by chunk (turn 2 appends user text + a crop image) and gives the
same logits as one full prefill of the whole conversation.

K and V are stored [layers, batch, kv_heads, slots, head_dim]: attention contracts over head_dim with
(batch, kv_heads) as leading batch dimensions, so reading the cache needs no transpose. A decode loop can
hold the cache unstacked (`KVCache.unstack`: one [B, K, S, H] buffer per layer) together with per-layer
weights (`Qwen25VL.decoder_layers`); `forward` then runs the layers as an unrolled Python loop. On XLA:CPU
this is much faster than the layer scan, which copies every layer's weight slice and cache slice out of
the stacked arrays on every step (measured in bench/README.md).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.models.qwen2_5_vl.layers import NEG_INF, apply_rope, attention, param, rms_norm
from mgpo_jax.models.qwen2_5_vl.vision import (VisionInputs, VisionTower, num_patches, pad_patches,
                                               prepare_vision_images)


@flax.struct.dataclass
class KVCache:
  # [L, B, K, S, H] arrays, or (after `unstack`) tuples of L per-layer [B, K, S, H] arrays.
  k_LBKSH: jax.Array | tuple[jax.Array, ...]
  v_LBKSH: jax.Array | tuple[jax.Array, ...]
  mask_BS: jax.Array    # bool: slot holds a real token
  end: jax.Array        # int32 scalar: first free slot (shared by all rows)
  next_pos_B: jax.Array  # int32: next M-RoPE text position of each row

  @classmethod
  def init(cls, cfg: Qwen25VLConfig, batch: int, size: int, dtype) -> "KVCache":
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, size, cfg.head_dim)
    return cls(k_LBKSH=jnp.zeros(shape, dtype), v_LBKSH=jnp.zeros(shape, dtype),
               mask_BS=jnp.zeros((batch, size), bool), end=jnp.zeros((), jnp.int32),
               next_pos_B=jnp.zeros((batch,), jnp.int32))

  @property
  def size(self) -> int:
    return self.mask_BS.shape[1]

  @property
  def stacked(self) -> bool:
    return not isinstance(self.k_LBKSH, (tuple, list))

  def unstack(self) -> "KVCache":
    """One buffer per layer (a copy of the cache): for a decode loop, so that no step slices the stack."""
    if not self.stacked:
      return self
    split = lambda x: tuple(x[l] for l in range(x.shape[0]))
    return self.replace(k_LBKSH=split(self.k_LBKSH), v_LBKSH=split(self.v_LBKSH))

  def stack(self) -> "KVCache":
    if self.stacked:
      return self
    return self.replace(k_LBKSH=jnp.stack(self.k_LBKSH), v_LBKSH=jnp.stack(self.v_LBKSH))


def cached_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS, scale: float):
  """Grouped-query attention of T queries against the cache layout [B, K, S, H]; K/V are not repeated
  over the G = N / K query heads of a group. Scores and softmax in float32.

  The G heads and T queries of a group are one matrix dimension (M = G T), so both products are plain
  batched [M, H] x [S, H]^T and [M, S] x [S, H] matmuls; at T = 1 (decode) every reshape is free. (With T
  as its own dot dimension XLA:CPU ran the decode dots twice as slowly.)
  """
  B, T, N, H = q_BTNH.shape
  K = k_BKSH.shape[1]
  G = N // K
  q_BKMH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  s_BKMS = jnp.einsum("BKMH,BKSH->BKMS", q_BKMH, k_BKSH, preferred_element_type=jnp.float32) * scale
  s_BKGTS = s_BKMS.reshape(B, K, G, T, -1)
  s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG_INF)
  p_BKMS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BKSH.dtype).reshape(B, K, G * T, -1)
  o_BKMH = jnp.einsum("BKMS,BKSH->BKMH", p_BKMS, v_BKSH)
  return o_BKMH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)


@jax.custom_vjp
def _matmul(x_BTD, w_DF):
  """`x @ w` whose weight gradient transposes the narrower operand explicitly. With plain autodiff XLA:CPU
  lays out the MLP's weight-gradient dots by materialising the [B T, mlp] cotangent transposed, a
  strided copy that took longer than the matmuls themselves (bench/README.md, train step profile)."""
  return x_BTD @ w_DF


def _matmul_fwd(x_BTD, w_DF):
  return x_BTD @ w_DF, (x_BTD, w_DF)


def _matmul_bwd(res, g_BTF):
  x_BTD, w_DF = res
  dx_BTD = (g_BTF @ w_DF.T).astype(x_BTD.dtype)
  D, F = w_DF.shape
  x_MD, g_MF = x_BTD.reshape(-1, D), g_BTF.reshape(-1, F)
  dw_DF = x_MD.T @ g_MF if D <= F else (g_MF.T @ x_MD).T
  return dx_BTD, dw_DF.astype(w_DF.dtype)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def layer_qkv(x_BTD, w, cos, sin, eps: float):
  """A decoder layer's first half: pre-norm, then q/k/v projections with M-RoPE on q and k."""
  h = rms_norm(x_BTD, w["input_norm"], eps)
  q = apply_rope(jnp.einsum("BTD,DNH->BTNH", h, w["q"]) + w["q_bias"], cos, sin)
  k = apply_rope(jnp.einsum("BTD,DKH->BTKH", h, w["k"]) + w["k_bias"], cos, sin)
  v = jnp.einsum("BTD,DKH->BTKH", h, w["v"]) + w["v_bias"]
  return q, k, v


def layer_out(x_BTD, o_BTNH, w, eps: float):
  """A decoder layer's second half: attention output projection + residual, then the SwiGLU MLP."""
  x_BTD = x_BTD + jnp.einsum("BTNH,NHD->BTD", o_BTNH, w["o"])
  h = rms_norm(x_BTD, w["post_norm"], eps)
  return x_BTD + _matmul(jax.nn.silu(_matmul(h, w["gate"])) * _matmul(h, w["up"]), w["down"])


def rope_index(input_ids_BT, mask_BT, image_grid_thw_I3, cfg: Qwen25VLConfig, start_pos_B=None):
  """M-RoPE position ids [3, B, T] and the next text position [B], as HF's `get_rope_index`.

  Text tokens advance all three streams by one. An image block of merged grid (h, w) gets
  t = base, h = base + row, w = base + col, and the following text starts at base + max(h, w).
  Images are matched to blocks in flattened (batch, sequence) order, like `pixel_values`.
  Masked (padding) tokens get position 0 and do not advance. `image_grid_thw_I3` may be padded with
  zero rows beyond the real images; it may be None for text only. A [B, I, 3] grid is per row (the
  batched-vision layout of `prepare_vision_batch`).
  """
  ids = jnp.asarray(input_ids_BT)
  B, T = ids.shape
  valid = jnp.ones((B, T), bool) if mask_BT is None else jnp.asarray(mask_BT).astype(bool)
  start = jnp.zeros((B,), jnp.int32) if start_pos_B is None else jnp.asarray(start_pos_B, jnp.int32)
  is_img = (ids == cfg.image_token_id) & valid
  if image_grid_thw_I3 is None:
    is_img = jnp.zeros_like(is_img)
    image_grid_thw_I3 = jnp.ones((1, 3), jnp.int32)
  grid = jnp.asarray(image_grid_thw_I3, jnp.int32)
  m = cfg.vision.spatial_merge_size
  prev = jnp.pad(is_img[:, :-1], ((0, 0), (1, 0)))
  block_start = is_img & ~prev
  if grid.ndim == 3:  # per-row grids [B, I, 3]: images counted within each row
    img_id = jnp.cumsum(block_start, axis=1) - 1
    g = jnp.take_along_axis(grid, jnp.clip(img_id, 0, grid.shape[1] - 1)[..., None], axis=1)
  else:               # flattened [I, 3]: images counted in (batch, sequence) order, like HF
    grid = grid.reshape(-1, 3)
    img_id = jnp.cumsum(block_start.reshape(-1)).reshape(B, T) - 1
    g = grid[jnp.clip(img_id, 0, grid.shape[0] - 1)]
  gt, gh, gw = g[..., 0], jnp.maximum(g[..., 1] // m, 1), jnp.maximum(g[..., 2] // m, 1)
  t_idx = jnp.arange(T, dtype=jnp.int32)[None]
  first = jax.lax.cummax(jnp.where(block_start, t_idx, -1), axis=1)
  j = t_idx - first
  off_t = j // (gh * gw)
  off_h = (j // gw) % gh
  off_w = j % gw
  last_of_block = is_img & (j == gt * gh * gw - 1)
  incr = jnp.where(valid & ~is_img, 1, 0) + jnp.where(last_of_block, jnp.maximum(gh, gw), 0)
  base = start[:, None] + jnp.cumsum(incr, axis=1) - incr
  zero = jnp.zeros_like(base)
  pos = jnp.stack([base + jnp.where(is_img, off_t, zero),
                   base + jnp.where(is_img, off_h, zero),
                   base + jnp.where(is_img, off_w, zero)])
  pos = jnp.where(valid[None], pos, 0).astype(jnp.int32)
  return pos, (start + incr.sum(axis=1)).astype(jnp.int32)


def mrope_cos_sin(positions_3BT, cfg: Qwen25VLConfig):
  """cos/sin [B, T, 1, head_dim] in float32; frequency i follows stream 0/1/2 by `mrope_section`."""
  H = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
  stream = np.repeat(np.arange(3), cfg.mrope_section)  # [H/2]: which stream drives each frequency
  pos_BTF = jnp.take_along_axis(
      jnp.moveaxis(positions_3BT, 0, -1).astype(jnp.float32),
      jnp.asarray(stream)[None, None, :], axis=-1)
  f = pos_BTF * inv_freq
  f = jnp.concatenate([f, f], -1)[:, :, None, :]
  return jnp.cos(f), jnp.sin(f)


def prefix_rows(x_G_, prefix_index_B, num_shards: int = 1):
  """[G, ...] -> [B, ...]: each row gets its prefix's entry, gathered within its block.

  Block i holds prefixes [i G/n, (i+1) G/n) and rows [i B/n, (i+1) B/n) (n = num_shards, the learner's
  per-device layout), so the gather stays on one device. A gather with global indices over the sharded
  prefix axis is what libtpu 0.0.42.1 aborted on at one prefix per device (collective_opt_utils.cc:79).
  """
  G, B, n = x_G_.shape[0], prefix_index_B.shape[0], num_shards
  local_B = jnp.asarray(prefix_index_B, jnp.int32) - (jnp.arange(B) // (B // n)) * (G // n)
  x_nG_ = x_G_.reshape(n, G // n, *x_G_.shape[1:])
  return jax.vmap(lambda x, i: x[i])(x_nG_, local_B.reshape(n, B // n)).reshape(B, *x_G_.shape[1:])


class Qwen25VL(nnx.Module):
  """Vision tower + Qwen2 decoder + LM head. `__call__` is the eager HF-like entry point; the jitted
  programs (sampler, train step) call `forward` with precomputed positions and vision inputs."""

  def __init__(self, cfg: Qwen25VLConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    L, D, F, N, K, H, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)
    p = lambda shape, axes, **kw: param(rngs, shape, axes, dtype, **kw)
    self.visual = VisionTower(cfg.vision, dtype=dtype, rngs=rngs)
    self.embed = p((V, D), ("vocab", "embed"))
    self.input_norm = p((L, D), ("layers", "norm"), init="ones")
    self.q = p((L, D, N, H), ("layers", "embed", "heads", "head_dim"))
    self.q_bias = p((L, N, H), ("layers", "heads", "head_dim"), init="zeros")
    self.k = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
    self.k_bias = p((L, K, H), ("layers", "kv_heads", "head_dim"), init="zeros")
    self.v = p((L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"))
    self.v_bias = p((L, K, H), ("layers", "kv_heads", "head_dim"), init="zeros")
    self.o = p((L, N, H, D), ("layers", "heads", "head_dim", "embed"))
    self.post_norm = p((L, D), ("layers", "norm"), init="ones")
    self.gate = p((L, D, F), ("layers", "embed", "mlp"))
    self.up = p((L, D, F), ("layers", "embed", "mlp"))
    self.down = p((L, F, D), ("layers", "mlp", "embed"))
    self.final_norm = p((D,), ("norm",), init="ones")
    if not cfg.tie_word_embeddings:
      self.lm_head = p((D, V), ("embed", "vocab"))
    self.remat = False  # set by the trainer: recompute each decoder and vision block in the backward pass

  # ------------------------------------------------------------------ pieces
  def embed_tokens(self, input_ids_BT, mask_BT, vision: VisionInputs | None):
    x_BTD = jnp.take(self.embed[...], input_ids_BT, axis=0)
    if vision is None:
      return x_BTD
    is_img = (input_ids_BT == self.cfg.image_token_id) & mask_BT.astype(bool)
    if vision.pixels_PC.ndim == 3 and vision.flat_order:
      # Rows packed with whole images (`prepare_vision_images`): each row's real features come first in it
      # (HF order), so reading the rows in turn, padding skipped, gives the flattened HF order.
      feats_RUD = jax.vmap(lambda v: self.visual(v, remat=self.remat))(vision).astype(x_BTD.dtype)
      R, U, D = feats_RUD.shape
      real_R = jnp.sum(vision.image_seg_P >= 0, axis=1) // self.cfg.vision.merge_unit
      real_RU = jnp.arange(U)[None, :] < real_R[:, None]
      order = jnp.argsort(~real_RU.reshape(-1), stable=True)  # real units first, in (row, unit) order
      feats_UD = feats_RUD.reshape(R * U, D)[order]
      idx = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
      gathered = feats_UD[jnp.clip(idx, 0, R * U - 1)]
    elif vision.pixels_PC.ndim == 3:
      # Batched layout: each row carries its own images, so rows shard together with their pixels.
      return insert_row_features(x_BTD, is_img, jax.vmap(lambda v: self.visual(v, remat=self.remat))(vision))
    else:
      # Image features replace <|image_pad|> tokens in flattened (batch, sequence) order.
      feats_UD = self.visual(vision, remat=self.remat).astype(x_BTD.dtype)
      idx = jnp.cumsum(is_img.reshape(-1)).reshape(is_img.shape) - 1
      gathered = feats_UD[jnp.clip(idx, 0, feats_UD.shape[0] - 1)]
    return jnp.where(is_img[..., None], gathered, x_BTD)

  def logits(self, h_BTD):
    w_DV = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
    return jnp.einsum("BTD,DV->BTV", h_BTD, w_DV, preferred_element_type=jnp.float32)

  def lm_head_weight(self):
    """[D, V] output projection (the tied embedding transposed for 3B)."""
    return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

  def layer_params(self):
    return dict(input_norm=self.input_norm[...], q=self.q[...], q_bias=self.q_bias[...],
                k=self.k[...], k_bias=self.k_bias[...], v=self.v[...], v_bias=self.v_bias[...],
                o=self.o[...], post_norm=self.post_norm[...], gate=self.gate[...], up=self.up[...],
                down=self.down[...])

  def decoder_layers(self) -> tuple[dict[str, jax.Array], ...]:
    """Each decoder layer's weights as separate arrays (a copy), for `forward` with an unstacked cache.

    Made once outside a decode loop, so no step slices (= copies, on XLA:CPU) the stacked weights.
    """
    return tuple(jax.tree.map(lambda a: a[l], self.layer_params()) for l in range(self.cfg.num_layers))

  # ------------------------------------------------------------------ decoder
  def forward(self, input_ids_BT, mask_BT, positions_3BT, vision: VisionInputs | None = None,
              cache: KVCache | None = None, next_pos_B=None, layers=None):
    """Final hidden states [B, T, D] (after the last norm) and the updated cache (or None).

    Without a cache: causal attention among the T tokens, restricted to `mask_BT`.
    With a cache: the T tokens are written at slots [end, end + T) and attend to every valid slot
    before them. The caller must keep end + T <= cache.size. `next_pos_B` (from `rope_index`) is
    stored in the cache so the next chunk continues the positions.
    A stacked cache runs the layers as one `lax.scan`; an unstacked one (`KVCache.unstack`) as an unrolled
    loop over `layers` (`decoder_layers()`; sliced here when None) and returns the cache unstacked.
    """
    cfg = self.cfg
    mask_BT = jnp.asarray(mask_BT).astype(bool)
    x_BTD = self.embed_tokens(input_ids_BT, mask_BT, vision)
    cos, sin = mrope_cos_sin(positions_3BT, cfg)
    B, T = mask_BT.shape
    scale = cfg.head_dim ** -0.5
    eps = cfg.rms_norm_eps

    if cache is None:
      causal_TT = jnp.tril(jnp.ones((T, T), bool))
      attn_mask_BTS = causal_TT[None] & mask_BT[:, None, :]
    else:
      slot_mask_BS = jax.lax.dynamic_update_slice(cache.mask_BS, mask_BT, (0, cache.end))
      slots_S = jnp.arange(cache.size)
      causal_TS = slots_S[None, :] <= cache.end + jnp.arange(T)[:, None]
      attn_mask_BTS = causal_TS[None] & slot_mask_BS[:, None, :]

    project = lambda x_BTD, w: layer_qkv(x_BTD, w, cos, sin, eps)
    finish = lambda x_BTD, o_BTNH, w: layer_out(x_BTD, o_BTNH, w, eps)

    def write(buf, new_BTKH, at):
      # Only the T new tokens are written (in place); `at` is the index of slot `end` in `buf`.
      new = jnp.swapaxes(new_BTKH, 1, 2).astype(buf.dtype)
      return jax.lax.dynamic_update_slice(buf, new.reshape((1,) * (buf.ndim - 4) + new.shape), at)

    if cache is None:
      def body(x, w):
        q, k, v = project(x, w)
        return finish(x, attention(q, k, v, attn_mask_BTS, scale), w), None
      if self.remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
      x_BTD, _ = jax.lax.scan(body, x_BTD, self.layer_params())
      return rms_norm(x_BTD, self.final_norm[...], eps), None

    if cache.stacked:
      # The stacked cache rides in the scan carry: each layer writes its new tokens straight into the
      # [L, B, K, S, H] buffer and reads its own slice for attention.
      def body(carry, xs):
        x, k_all, v_all = carry
        w, l = xs
        q, k, v = project(x, w)
        k_all = write(k_all, k, (l, 0, 0, cache.end, 0))
        v_all = write(v_all, v, (l, 0, 0, cache.end, 0))
        o = cached_attention(q, k_all[l], v_all[l], attn_mask_BTS, scale)
        return (finish(x, o, w), k_all, v_all), None
      (x_BTD, k_new, v_new), _ = jax.lax.scan(
          body, (x_BTD, cache.k_LBKSH, cache.v_LBKSH), (self.layer_params(), jnp.arange(cfg.num_layers)))
    else:
      if len(cache.k_LBKSH) != cfg.num_layers:
        raise ValueError(f"unstacked cache has {len(cache.k_LBKSH)} layers, the model {cfg.num_layers}")
      layers = self.decoder_layers() if layers is None else layers
      k_new, v_new = [], []
      for w, k_buf, v_buf in zip(layers, cache.k_LBKSH, cache.v_LBKSH):
        q, k, v = project(x_BTD, w)
        k_buf = write(k_buf, k, (0, 0, cache.end, 0))
        v_buf = write(v_buf, v, (0, 0, cache.end, 0))
        x_BTD = finish(x_BTD, cached_attention(q, k_buf, v_buf, attn_mask_BTS, scale), w)
        k_new.append(k_buf)
        v_new.append(v_buf)
      k_new, v_new = tuple(k_new), tuple(v_new)
    new_cache = KVCache(k_LBKSH=k_new, v_LBKSH=v_new, mask_BS=slot_mask_BS, end=cache.end + T,
                        next_pos_B=cache.next_pos_B if next_pos_B is None else next_pos_B)
    return rms_norm(x_BTD, self.final_norm[...], eps), new_cache

  def forward_shared(self, prefix_ids_GS, prefix_mask_GS, prefix_positions_3GS, prefix_vision: VisionInputs | None,
                     input_ids_BT, mask_BT, positions_3BT, vision: VisionInputs | None, prefix_index_B,
                     num_shards: int = 1):
    """Final hidden states [B, T, D] of continuations that each follow one of G shared prefixes.

    Equal to `forward` over each row's whole sequence (its prefix's real tokens, then its continuation),
    restricted to the continuation, but every prefix (and its images' vision-tower pass) is computed once:

      layer l:  prefix g     q/k/v over [G, S], causal attention among its real tokens
                row b        keys = [k_prefix[prefix_index_B[b]] (S slots, prefix mask) | own keys (causal, mask)]

    The per-row keys/values of the prefix are a gather of the prefix's, so autodiff sums each row's
    gradient into its prefix. `positions_3BT` must continue the prefix's M-RoPE positions (`rope_index`
    with `start_pos_B` = the prefix's next position). With `num_shards` > 1 rows and prefixes are split into
    that many equal consecutive blocks and row block i may only point at prefix block i (the learner's
    per-device layout): the gather then stays within a block, i.e. on one device.
    """
    cfg = self.cfg
    eps, scale = cfg.rms_norm_eps, cfg.head_dim ** -0.5
    pmask_GS = jnp.asarray(prefix_mask_GS).astype(bool)
    mask_BT = jnp.asarray(mask_BT).astype(bool)
    G, S = pmask_GS.shape
    B, T = mask_BT.shape
    n = num_shards
    if G % n or B % n:
      raise ValueError(f"{G} prefixes and {B} rows must both split into num_shards={n} blocks")
    feats_GUD, feats_BUD = encode_prefix_and_row_images(self.visual, prefix_vision, vision, self.remat)
    embed = lambda ids, m, f: insert_row_features(jnp.take(self.embed[...], ids, axis=0),
                                                  (ids == cfg.image_token_id) & m, f)
    xp_GSD = embed(prefix_ids_GS, pmask_GS, feats_GUD)
    xc_BTD = embed(input_ids_BT, mask_BT, feats_BUD)
    cos_p, sin_p = mrope_cos_sin(prefix_positions_3GS, cfg)
    cos_c, sin_c = mrope_cos_sin(positions_3BT, cfg)
    to_rows = lambda x_G_: prefix_rows(x_G_, prefix_index_B, n)

    causal_TT = jnp.tril(jnp.ones((S, S), bool))
    prefix_attn_GSS = causal_TT[None] & pmask_GS[:, None, :]
    own_BTT = jnp.tril(jnp.ones((T, T), bool))[None] & mask_BT[:, None, :]
    row_attn_BTS = jnp.concatenate([jnp.broadcast_to(to_rows(pmask_GS)[:, None, :], (B, T, S)), own_BTT], axis=2)

    project = lambda x_BTD, w, cos, sin: layer_qkv(x_BTD, w, cos, sin, eps)
    finish = lambda x_BTD, o_BTNH, w: layer_out(x_BTD, o_BTNH, w, eps)

    def body(carry, w):
      xp, xc = carry
      qp, kp, vp = project(xp, w, cos_p, sin_p)
      qc, kc, vc = project(xc, w, cos_c, sin_c)
      k_all = jnp.concatenate([to_rows(kp), kc], axis=1)
      v_all = jnp.concatenate([to_rows(vp), vc], axis=1)
      xc = finish(xc, attention(qc, k_all, v_all, row_attn_BTS, scale), w)
      xp = finish(xp, attention(qp, kp, vp, prefix_attn_GSS, scale), w)
      return (xp, xc), None

    if self.remat:
      body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    (_, xc_BTD), _ = jax.lax.scan(body, (xp_GSD, xc_BTD), self.layer_params())
    return rms_norm(xc_BTD, self.final_norm[...], eps)

  def extend(self, cache: KVCache, input_ids_BT, mask_BT, vision: VisionInputs | None = None,
             image_grid_thw_I3=None, layers=None):
    """Append a chunk (prompt, a decoded token, or a new user turn with images) to the cache.

    Positions continue from `cache.next_pos_B`. Returns (hidden [B, T, D], new cache). Jit-friendly.
    `layers`: per-layer weights (`decoder_layers()`) for an unstacked cache.
    """
    positions, next_pos = rope_index(input_ids_BT, mask_BT, image_grid_thw_I3 if vision is not None else None,
                                     self.cfg, start_pos_B=cache.next_pos_B)
    return self.forward(input_ids_BT, mask_BT, positions, vision, cache=cache, next_pos_B=next_pos,
                        layers=layers)

  # ------------------------------------------------------------------ eager HF-like entry point
  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None):
    """Logits [B, T, vocab] (float32) for a padded batch, like HF's forward(...).logits."""
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if ids.ndim != 2 or mask.shape != ids.shape:
      raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, seq]")
    vision = None
    if pixel_values is not None:
      if image_grid_thw is None:
        raise ValueError("pixel_values given without image_grid_thw")
      check_image_tokens(ids, mask, image_grid_thw, self.cfg)
      # Rows of whole images, not one sequence of all the batch's patches: attention stays within images.
      vision = prepare_vision_images(pixel_values, image_grid_thw, self.cfg.vision)
    elif ((ids == self.cfg.image_token_id) & (mask > 0)).any():
      raise ValueError("input_ids contain <|image_pad|> tokens but no pixel_values were given")
    grid = None if vision is None else np.asarray(image_grid_thw).reshape(-1, 3)
    return _logits_jit(self, jnp.asarray(ids), jnp.asarray(mask), grid, vision)


def insert_row_features(x_BTD, is_img_BT, feats_BUD):
  """Row b's image features (batched layout [B, U, D], in order) replace its <|image_pad|> embeddings;
  `feats_BUD` None: no images, `x_BTD` unchanged."""
  if feats_BUD is None:
    return x_BTD
  feats_BUD = feats_BUD.astype(x_BTD.dtype)
  idx = jnp.clip(jnp.cumsum(is_img_BT, axis=1) - 1, 0, feats_BUD.shape[1] - 1)
  gathered = jnp.take_along_axis(feats_BUD, idx[..., None], axis=1)
  return jnp.where(is_img_BT[..., None], gathered, x_BTD)


def encode_prefix_and_row_images(visual: VisionTower, prefix_vision: VisionInputs | None,
                                 vision: VisionInputs | None, remat: bool):
  """Vision features of the prefixes' images [G, Up, D] and of the rows' own (crop) images [B, U, D]
  (batched layouts; None where the input is None), from ONE vision-tower pass over both sets of rows.

  Why one pass: every vision block runs collectives (on a sharded mesh), so a tower pass is a stream of
  collectives. XLA:CPU fixes only the order in which two independent streams START, not how their
  collectives interleave, so two passes in one program (prefixes, then crops) reach gloo in different
  orders on different processes and a multi-process CPU run fails with a collective size mismatch. One
  pass over the rows [prefixes; crops] is one stream. (The same holds for any collective that does not
  depend on the pass but is scheduled after it starts; with this plain concatenation XLA schedules
  those before the pass. Joining the rows per shard block instead, to keep them on their device,
  moved some index gathers after it and the two-process run failed again.)

  Both sets are padded to the larger patch bucket (`pad_patches`; padding contributes nothing). Cost:
  when the prompt bucket Pp exceeds the crop bucket P, every crop row is encoded at Pp patches, i.e. the
  crops' vision work grows from B x P to B x Pp patches (attention: B x P^2 to B x Pp^2); likewise
  G x (P - Pp) padded patches for the prefixes when P > Pp.
  """
  if prefix_vision is None or vision is None:
    encode = lambda v: None if v is None else jax.vmap(lambda r: visual(r, remat=remat))(v)
    return encode(prefix_vision), encode(vision)
  G, Pp = prefix_vision.pixels_PC.shape[:2]
  P = vision.pixels_PC.shape[1]
  Up, U = prefix_vision.restore_U.shape[1], vision.restore_U.shape[1]
  pad_to = max(Pp, P)
  joined = jax.tree.map(lambda p, c: jnp.concatenate([p, c]),
                        pad_patches(prefix_vision, pad_to), pad_patches(vision, pad_to))
  feats = jax.vmap(lambda r: visual(r, remat=remat))(joined)
  feats_GUD, feats_BUD = feats[:G, :Up], feats[G:, :U]
  return feats_GUD, feats_BUD


@nnx.jit
def _logits_jit(model: Qwen25VL, ids_BT, mask_BT, grid_I3, vision):
  positions, _ = rope_index(ids_BT, mask_BT, grid_I3, model.cfg)
  h, _ = model.forward(ids_BT, mask_BT, positions, vision)
  return model.logits(h)


def check_image_tokens(input_ids, attention_mask, image_grid_thw, cfg: Qwen25VLConfig) -> None:
  """Host-side check that <|image_pad|> tokens and image features agree (HF raises the same way)."""
  ids = np.asarray(input_ids)
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  grid = np.asarray(image_grid_thw).reshape(-1, 3)
  n_tokens = int(((ids == cfg.image_token_id) & (mask > 0)).sum())
  n_feats = num_patches(grid) // cfg.vision.merge_unit
  if n_tokens != n_feats:
    raise ValueError(f"Image features and image tokens do not match: {n_tokens} <|image_pad|> tokens "
                     f"(id {cfg.image_token_id}) but image_grid_thw {grid.tolist()} gives {n_feats} features")
