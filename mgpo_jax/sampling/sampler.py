"""Jitted prefill + decode with a KV cache that a conversation can continue turn after turn.

One jitted program per call: `model.extend` prefills the new chunk (prompt, or the next user turn with
its crop image), then a `lax.while_loop` decodes. Each loop iteration feeds the token emitted by the
previous one and samples the next:

  prefill(chunk) -> sample t0 | feed t0 -> sample t1 | ... | feed t_last -> (nothing left to sample)

so the loop runs one extra step after the last row stops. That step writes every row's final token
(its EOS, or the token that completed a stop string) into the cache, and its logits give the log-prob of
a closing token (`close_id`, `<|im_end|>`) after the turn, which the MGPO rollout needs when it closes a
turn the model did not close itself. After a call the cache therefore holds exactly: the chunk + every
emitted token, and the next turn prefills only its own new tokens; M-RoPE positions continue from
`cache.next_pos_B`.

Loop condition: `step <= max_new & any(row has an unfed token) & ~cache_full`.

Shapes are static per bucket (prompt length, patches per row, images per row, new tokens, cache size);
values that change between calls (temperature, top-p, top-k, max_new_tokens, EOS ids, stop tables,
forced tokens, rng) are traced, so after warm-up nothing recompiles.

Rows are left padded per chunk (so the last column is every row's last token); rows with an empty chunk
emit nothing. Images use the batched (per-row) vision layout of `prepare_vision_batch`.

Shared prompts (`SamplerConfig.share_prompts`): `start` prefills each distinct (tokens, images) row once
and copies its KV cache rows, last logits and next positions to every row that repeats it, then decodes
all rows as usual (a row's key, hence its samples, is its own):

  rows   p0 p1 p0 p0 p1        prefill [p0, p1] (G rows, padded to a power of two)
  cache  [p0][p1]  --take rows [0 1 0 0 1]-->  [p0][p1][p0][p0][p1]  --> decode 5 rows
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgpo_jax.models.qwen2_5_vl.model import KVCache, Qwen25VL
from mgpo_jax.models.qwen2_5_vl.vision import num_patches, prepare_vision_batch
from mgpo_jax.sampling import logits as logits_lib
from mgpo_jax.sampling import stops as stops_lib
from mgpo_jax.sampling.logits import SamplingParams


class StopReason(enum.IntEnum):
  NONE = 0        # the row emitted nothing (empty chunk, or max_new_tokens = 0)
  EOS = 1         # emitted an EOS id (kept as the row's last token)
  STOP = 2        # a stop rule fired (the firing token is the row's last token)
  LENGTH = 3      # max_new_tokens reached
  CACHE_FULL = 4  # the KV cache ran out (cannot happen with the sizes the Sampler picks)


def pow2_buckets(lo: int, hi: int) -> tuple[int, ...]:
  """(lo, 2 lo, 4 lo, ..., >= hi)."""
  out = [lo]
  while out[-1] < hi:
    out.append(out[-1] * 2)
  return tuple(out)


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
  """Smallest bucket >= n; ValueError naming `what` if there is none."""
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"{what} = {n} exceeds the largest bucket {buckets[-1]} (SamplerConfig)")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Compile-time settings only: bucket sets and static maxima."""

  prompt_buckets: tuple[int, ...] = pow2_buckets(16, 32768)       # tokens per prefilled chunk
  new_token_buckets: tuple[int, ...] = pow2_buckets(16, 16384)    # output buffer length
  patch_buckets: tuple[int, ...] = pow2_buckets(64, 65536)        # vision patches per row per chunk
  image_buckets: tuple[int, ...] = (1, 2, 4, 8)                   # images per row per chunk
  cache_buckets: tuple[int, ...] = pow2_buckets(64, 131072)       # KV cache slots
  max_top_k: int = 64
  max_eos_ids: int = 4
  max_banned_ids: int = 8
  max_stop_rules: int = 2
  max_stop_states: int = 16
  cache_dtype: Any = None  # None: the model's parameter dtype
  # Decode loop with the layers unrolled over per-layer weights and KV buffers, sliced once per call
  # (`Qwen25VL.decoder_layers`, `KVCache.unstack`) instead of a layer scan over the stacked arrays, which on
  # XLA:CPU copies every layer's weights and cache out of the stack at every step. Costs a transient copy
  # of the decoder weights and of the KV cache per call, and compile time grows with the layers.
  # None: on when the default backend is CPU.
  unroll_decode: bool | None = None
  # `start` prefills (and vision-encodes) each distinct row once and gives its duplicates a copy of its
  # KV cache, logits and positions before decoding; decoding, keys and later turns stay per row. MGPO
  # repeats each prompt `num_generations` times, so this divides the turn-1 prefill by that much.
  # The number of distinct rows is padded to a power of two (a static bucket).
  share_prompts: bool = True

  def __post_init__(self):
    for name in ("prompt_buckets", "new_token_buckets", "patch_buckets", "image_buckets", "cache_buckets"):
      b = getattr(self, name)
      if not b or any(x <= 0 for x in b) or list(b) != sorted(set(b)):
        raise ValueError(f"SamplerConfig.{name} must be increasing positive ints, got {b}")
    for name in ("max_top_k", "max_eos_ids", "max_banned_ids", "max_stop_rules", "max_stop_states"):
      if getattr(self, name) < 0:
        raise ValueError(f"SamplerConfig.{name} must be >= 0")


class SampleOutput(NamedTuple):
  """What one sampler call returns (host numpy arrays; access fields by name)."""

  tokens: np.ndarray          # int32 [B, max_new_tokens]: emitted tokens, pad_id after the last one
  logprobs: np.ndarray        # float32 [B, max_new_tokens]: log_softmax(logits / T)[token], 0 after
  lengths: np.ndarray         # int32 [B]: emitted tokens, including the EOS / stop token
  stop_reasons: np.ndarray    # int32 [B]: StopReason
  close_logprobs: np.ndarray  # float32 [B]: log p(close_id | all emitted); 0 without close_id or tokens
  prep_s: float = 0.0         # host time: padding, vision bookkeeping, transfers
  device_s: float = 0.0       # dispatch until the outputs are on the host


@dataclasses.dataclass
class Conversation:
  """A batch of conversations on device: pass it to `Sampler.extend` (it is consumed: donated)."""

  cache: KVCache
  end: int  # host copy of cache.end

  @property
  def batch(self) -> int:
    return self.cache.mask_BS.shape[0]


@flax.struct.dataclass
class _Loop:
  step: jax.Array          # index of the next token to sample
  tokens_BN: jax.Array
  logp_BN: jax.Array
  last_B: jax.Array        # last emitted token (fed at the next iteration)
  pending_B: jax.Array     # last_B is emitted but not yet in the cache
  done_B: jax.Array
  length_B: jax.Array
  reason_B: jax.Array
  stop_BR: jax.Array       # stop automaton states
  close_logp_B: jax.Array
  cache: KVCache
  rng: jax.Array


def _emit(s: _Loop, logits_BV, params: SamplingParams, eos_E, stops, force_BN, max_top_k: int) -> _Loop:
  """Samples token `s.step` for the rows still running and updates the stop bookkeeping."""
  N = s.tokens_BN.shape[1]
  forced_B = jnp.take(force_BN, jnp.minimum(s.step, N - 1), axis=1)
  key = (jax.vmap(jax.random.fold_in, in_axes=(0, None))(s.rng, s.step) if jnp.ndim(s.rng) == 1
         else jax.random.fold_in(s.rng, s.step))
  tok_B, logp_B = logits_lib.choose(logits_BV, params, key, max_top_k,
                                    forced_B=forced_B)
  can_B = ~s.done_B & (s.step < params.max_new_tokens)
  at_BN = can_B[:, None] & (jnp.arange(N)[None, :] == s.step)
  stop_BR, fired_B = stops_lib.advance(stops, s.stop_BR, tok_B)
  eos_B = (tok_B[:, None] == eos_E[None, :]).any(axis=1)
  length_B = s.length_B + can_B
  full_B = length_B >= params.max_new_tokens
  reason_B = jnp.select([~can_B, eos_B, fired_B, full_B],
                        [s.reason_B, StopReason.EOS, StopReason.STOP, StopReason.LENGTH], s.reason_B)
  return s.replace(
      tokens_BN=jnp.where(at_BN, tok_B[:, None], s.tokens_BN),
      logp_BN=jnp.where(at_BN, logp_B[:, None], s.logp_BN),
      last_B=jnp.where(can_B, tok_B, s.last_B),
      pending_B=can_B,
      done_B=s.done_B | (can_B & (eos_B | fired_B | full_B)),
      length_B=length_B,
      reason_B=reason_B.astype(jnp.int32),
      stop_BR=jnp.where(can_B[:, None], stop_BR, s.stop_BR))


def _prefill_and_decode(model: Qwen25VL, cache: KVCache, ids_BT, mask_BT, vision, grid_BI3,
                        params: SamplingParams, eos_E, stops, force_BN, rng, max_top_k: int, unroll: bool,
                        row_of_B=None):
  """Prefills the chunk, then decodes. With `row_of_B`, the chunk's rows are the distinct prompts
  (cache, ids, mask: [G, ...]) and row b of the output decodes from a copy of prompt row_of_B[b]."""
  h_GTD, cache = model.extend(cache, ids_BT, mask_BT, vision, grid_BI3)
  logits_BV = model.logits(h_GTD[:, -1:])[:, 0]
  if row_of_B is not None:
    take = lambda x, axis: jnp.take(x, row_of_B, axis=axis)
    cache = cache.replace(k_LBKSH=take(cache.k_LBKSH, 1), v_LBKSH=take(cache.v_LBKSH, 1),
                          mask_BS=take(cache.mask_BS, 0), next_pos_B=take(cache.next_pos_B, 0))
    logits_BV, mask_BT = take(logits_BV, 0), take(mask_BT, 0)
  return _decode(model, cache, logits_BV, mask_BT, params, eos_E, stops, force_BN, rng, max_top_k, unroll)


def _decode(model: Qwen25VL, cache: KVCache, logits_BV, mask_BT, params: SamplingParams, eos_E, stops,
            force_BN, rng, max_top_k: int, unroll: bool):
  """Samples from the prefill's last logits, then decodes token by token (`lax.while_loop`)."""
  B, N = force_BN.shape
  layers = None
  if unroll:  # sliced once here, outside the loop (see SamplerConfig.unroll_decode)
    layers, cache = model.decoder_layers(), cache.unstack()
  active_B = mask_BT.astype(bool).any(axis=1) & (params.max_new_tokens > 0)
  s = _Loop(
      step=jnp.zeros((), jnp.int32),
      tokens_BN=jnp.full((B, N), params.pad_id, jnp.int32),
      logp_BN=jnp.zeros((B, N), jnp.float32),
      last_B=jnp.zeros((B,), jnp.int32),
      pending_B=jnp.zeros((B,), bool),
      done_B=~active_B,
      length_B=jnp.zeros((B,), jnp.int32),
      reason_B=jnp.full((B,), StopReason.NONE, jnp.int32),
      stop_BR=jnp.zeros((B, stops.accept_R.shape[0]), jnp.int32),
      close_logp_B=jnp.zeros((B,), jnp.float32),
      cache=cache, rng=rng)
  s = _emit(s, logits_BV, params, eos_E, stops, force_BN, max_top_k)
  s = s.replace(step=s.step + 1)

  def cond(s: _Loop):
    return (s.step <= params.max_new_tokens) & s.pending_B.any() & (s.cache.end < s.cache.size)

  def body(s: _Loop):
    fed_B = s.pending_B
    h_B1D, cache = model.extend(s.cache, s.last_B[:, None], fed_B[:, None], layers=layers)
    logits_BV = model.logits(h_B1D)[:, 0]
    finished_B = fed_B & s.done_B & (params.close_id >= 0)  # the row's final token was just fed
    # A full-vocabulary log-softmax only on the few steps where some row has just finished.
    close_B = jax.lax.cond(finished_B.any(),
                           lambda: logits_lib.token_logprob(logits_BV, params, jnp.full((B,), params.close_id)),
                           lambda: jnp.zeros((B,), jnp.float32))
    s = s.replace(cache=cache, close_logp_B=jnp.where(finished_B, close_B, s.close_logp_B))
    s = _emit(s, logits_BV, params, eos_E, stops, force_BN, max_top_k)
    return s.replace(step=s.step + 1)

  s = jax.lax.while_loop(cond, body, s)
  reason_B = jnp.where(s.done_B, s.reason_B, StopReason.CACHE_FULL)  # inactive rows start done
  return (s.tokens_BN, s.logp_BN, s.length_B, reason_B.astype(jnp.int32), s.close_logp_B), s.cache.stack()


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_size", "cache_dtype", "max_top_k", "unroll"))
def _start(graphdef, state, ids_BT, mask_BT, vision, grid_BI3, params, eos_E, stops, force_BN, rng,
           row_of_B=None, *, cache_size: int, cache_dtype, max_top_k: int, unroll: bool):
  model = nnx.merge(graphdef, state)
  cache = KVCache.init(model.cfg, ids_BT.shape[0], cache_size, cache_dtype)
  return _prefill_and_decode(model, cache, ids_BT, mask_BT, vision, grid_BI3, params, eos_E, stops,
                             force_BN, rng, max_top_k, unroll, row_of_B)


# The cache is donated: it is updated in place, so a continued conversation never holds two copies of it.
@functools.partial(jax.jit, static_argnames=("graphdef", "max_top_k", "unroll"), donate_argnames=("cache",))
def _continue(graphdef, state, cache, ids_BT, mask_BT, vision, grid_BI3, params, eos_E, stops, force_BN,
              rng, *, max_top_k: int, unroll: bool):
  model = nnx.merge(graphdef, state)
  return _prefill_and_decode(model, cache, ids_BT, mask_BT, vision, grid_BI3, params, eos_E, stops,
                             force_BN, rng, max_top_k, unroll)


@functools.partial(jax.jit, static_argnames=("size",))
def _grow(cache: KVCache, *, size: int) -> KVCache:
  # Not donated: the output is larger, so the input buffers could not be reused anyway.
  pad = size - cache.size
  kv = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))  # [L, B, K, S, H]: pad slots
  return cache.replace(k_LBKSH=kv(cache.k_LBKSH), v_LBKSH=kv(cache.v_LBKSH),
                       mask_BS=jnp.pad(cache.mask_BS, ((0, 0), (0, pad))))


RowImages = tuple[np.ndarray, np.ndarray]  # (pixel_values [P, C], grid_thw [I, 3]) of one row's chunk


def _distinct_rows(rows, images):
  """The distinct (tokens, images) rows, padded with empty rows to a power of two, and which of them
  each input row is; (rows, images, None) when no two rows are the same (nothing to share)."""
  images = [None] * len(rows) if images is None else list(images)
  uniq, of_key, row_of = [], {}, []
  for r, im in zip(rows, images):
    r = np.asarray(r, np.int64).reshape(-1)
    grid = None if im is None else np.asarray(im[1], np.int64).reshape(-1, 3)
    pv = None if im is None else np.asarray(im[0])
    key = (r.tobytes(), None if grid is None else grid.tobytes(), None if pv is None else (pv.shape, pv.dtype.str))
    for u in of_key.setdefault(key, []):  # same tokens and grids: compare the pixels (the same array in MGPO)
      upv = uniq[u][1]
      if pv is None or upv[0] is im[0] or np.array_equal(upv[0], pv):
        row_of.append(u)
        break
    else:
      of_key[key].append(len(uniq))
      row_of.append(len(uniq))
      uniq.append((r, im))
  if len(uniq) == len(rows):
    return rows, (None if all(im is None for im in images) else images), None
  G = min(1 << (len(uniq) - 1).bit_length(), len(rows))
  pad = G - len(uniq)
  return ([u[0] for u in uniq] + [np.zeros(0, np.int64)] * pad, [u[1] for u in uniq] + [None] * pad,
          np.asarray(row_of, np.int32))


class Sampler:
  """Samples from a Qwen25VL with static-shape programs; holds the split model (graphdef, state).

  ```python
  sampler = Sampler(model, SamplerConfig(), tokenizer=tok)
  out1, conv = sampler.start(prompt_rows, images, max_new_tokens=256, temperature=1.0,
                             eos_token_ids=[im_end], stop=[parse.TURN1_STOP], close_token_id=im_end, rng=k1)
  out2, conv = sampler.extend(conv, turn2_rows, crop_images, max_new_tokens=256, ..., rng=k2)
  ```
  Rows are lists of token ids (the chunk each row appends); images per row are `(pixel_values, grid_thw)`
  or None. After a policy update call `update(model)`: weights are traced arguments, nothing recompiles.
  """

  def __init__(self, model: Qwen25VL, cfg: SamplerConfig = SamplerConfig(), tokenizer=None):
    self.cfg = cfg
    self.model_cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)
    self.cache_dtype = jnp.dtype(cfg.cache_dtype or model.embed[...].dtype)
    self.unroll = jax.default_backend() == "cpu" if cfg.unroll_decode is None else bool(cfg.unroll_decode)
    merge = model.cfg.vision.merge_unit
    if any(p % merge for p in cfg.patch_buckets):
      raise ValueError(f"SamplerConfig.patch_buckets {cfg.patch_buckets} must be multiples of {merge}")
    self.compile_stops = stops_lib.StopCompiler(tokenizer, model.cfg.vocab_size, cfg.max_stop_rules,
                                                cfg.max_stop_states)

  def update(self, model: Qwen25VL) -> None:
    """Takes the current weights of `model` (same architecture)."""
    graphdef, self.state = nnx.split(model)
    if graphdef != self.graphdef:
      raise ValueError("Sampler.update: the model's structure differs from the one the Sampler was built for")

  # ------------------------------------------------------------------ public calls
  def start(self, rows: Sequence[Sequence[int]], images: Sequence[RowImages | None] | None = None, *,
            max_new_tokens: int, reserve: int = 0, **kw) -> tuple[SampleOutput, Conversation]:
    """Prefills `rows` into a new cache and samples. `reserve`: extra cache slots for later turns.

    Keyword args: temperature=0.0, top_p=1.0, top_k=0, eos_token_ids=None (the model config's),
    stop=() (stop rules, see `stops`), close_token_id=None, pad_id=None (the config's pad, else 0),
    rng=None (required when temperature > 0; one key, or one key per row so that a row's samples do not
    depend on the rest of the batch), banned_token_ids=() (never sampled), force_tokens=None
    (per row, the ids to emit at steps 0, 1, ... instead of sampling, -1 = sample: teacher forcing;
    their log-probs are still the model's).
    """
    t0 = time.perf_counter()
    row_of_B = None
    if self.cfg.share_prompts:
      rows, images, row_of_B = _distinct_rows(rows, images)
    chunk = self._chunk(rows, images)
    call = self._call_args(len(row_of_B) if row_of_B is not None else len(rows), max_new_tokens, **kw)
    size = bucket(chunk[0].shape[1] + call["force_BN"].shape[1] + 1 + reserve, self.cfg.cache_buckets,
                  "cache slots (chunk + new tokens + 1 + reserve)")
    t1 = time.perf_counter()
    outs, cache = _start(graphdef=self.graphdef, state=self.state, ids_BT=chunk[0], mask_BT=chunk[1],
                         vision=chunk[2], grid_BI3=chunk[3], params=call["params"], eos_E=call["eos_E"],
                         stops=call["stops"], force_BN=call["force_BN"], rng=call["rng"],
                         row_of_B=None if row_of_B is None else jnp.asarray(row_of_B), cache_size=size,
                         cache_dtype=self.cache_dtype, max_top_k=self.cfg.max_top_k, unroll=self.unroll)
    return self._finish(outs, cache, max_new_tokens, t0, t1)

  def extend(self, conv: Conversation, rows: Sequence[Sequence[int]],
             images: Sequence[RowImages | None] | None = None, *, max_new_tokens: int, reserve: int = 0,
             **kw) -> tuple[SampleOutput, Conversation]:
    """Appends `rows` to the conversations of `conv` (consumed) and samples; same keywords as `start`."""
    t0 = time.perf_counter()
    if len(rows) != conv.batch:
      raise ValueError(f"extend: {len(rows)} rows for a conversation batch of {conv.batch}")
    chunk = self._chunk(rows, images)
    call = self._call_args(len(rows), max_new_tokens, **kw)
    need = conv.end + chunk[0].shape[1] + call["force_BN"].shape[1] + 1 + reserve
    cache = conv.cache
    if need > cache.size:
      cache = _grow(cache, size=bucket(need, self.cfg.cache_buckets, "cache slots"))
    conv.cache = None  # donated below
    t1 = time.perf_counter()
    outs, cache = _continue(graphdef=self.graphdef, state=self.state, cache=cache, ids_BT=chunk[0],
                            mask_BT=chunk[1], vision=chunk[2], grid_BI3=chunk[3], params=call["params"],
                            eos_E=call["eos_E"], stops=call["stops"], force_BN=call["force_BN"],
                            rng=call["rng"], max_top_k=self.cfg.max_top_k, unroll=self.unroll)
    return self._finish(outs, cache, max_new_tokens, t0, t1)

  # ------------------------------------------------------------------ host-side preparation
  def _chunk(self, rows, images):
    """Left-padded ids/mask [B, T_bucket] and the batched vision inputs (or None)."""
    cfg, mcfg = self.cfg, self.model_cfg
    B = len(rows)
    if B == 0:
      raise ValueError("no rows to sample")
    rows = [np.asarray(r, np.int64).reshape(-1) for r in rows]
    for b, r in enumerate(rows):
      if r.size and (r.min() < 0 or r.max() >= mcfg.vocab_size):
        raise ValueError(f"row {b} has token ids outside [0, {mcfg.vocab_size})")
    T = bucket(max(max(len(r) for r in rows), 1), cfg.prompt_buckets, "chunk length")
    ids = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), np.int32)
    for b, r in enumerate(rows):
      if len(r):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    if images is not None and len(images) != B:
      raise ValueError(f"images has {len(images)} entries for {B} rows")
    images = [None] * B if images is None else list(images)
    merge = mcfg.vision.merge_unit
    pvs, grids = [], []
    for b, (r, im) in enumerate(zip(rows, images)):
      n_tok = int((r == mcfg.image_token_id).sum())
      g = np.zeros((0, 3), np.int64) if im is None else np.asarray(im[1], np.int64).reshape(-1, 3)
      if n_tok != num_patches(g) // merge:
        raise ValueError(f"row {b}: {n_tok} <|image_pad|> tokens (id {mcfg.image_token_id}) but its images "
                         f"{g.tolist()} give {num_patches(g) // merge} features")
      pvs.append(None if im is None else np.asarray(im[0]))
      grids.append(g)
    if not any(len(g) for g in grids):
      return jnp.asarray(ids), jnp.asarray(mask), None, None
    P = bucket(max(num_patches(g) for g in grids), cfg.patch_buckets, "patches per row")
    I = bucket(max(len(g) for g in grids), cfg.image_buckets, "images per row")
    vision, grid_BI3 = prepare_vision_batch(pvs, grids, mcfg.vision, pad_to=P, max_images=I)
    return jnp.asarray(ids), jnp.asarray(mask), jax.tree.map(jnp.asarray, vision), jnp.asarray(grid_BI3)

  def _call_args(self, B: int, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, eos_token_ids: Sequence[int] | int | None = None, stop: Sequence[Any] = (),
                 close_token_id: int | None = None, pad_id: int | None = None, rng=None,
                 force_tokens=None, banned_token_ids: Sequence[int] = ()) -> dict[str, Any]:
    cfg, mcfg = self.cfg, self.model_cfg
    if not 0 <= max_new_tokens:
      raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    N = bucket(max(max_new_tokens, 1), cfg.new_token_buckets, "max_new_tokens")
    if not (np.isfinite(temperature) and temperature >= 0):
      raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= top_k <= cfg.max_top_k:
      raise ValueError(f"top_k must be in [0, SamplerConfig.max_top_k={cfg.max_top_k}], got {top_k}")
    if eos_token_ids is None:
      eos_token_ids = mcfg.eos_token_id
    eos = [] if eos_token_ids is None else np.atleast_1d(np.asarray(eos_token_ids, np.int64)).tolist()
    if len(eos) > cfg.max_eos_ids:
      raise ValueError(f"{len(eos)} EOS ids, but SamplerConfig.max_eos_ids={cfg.max_eos_ids}")
    banned = [int(i) for i in banned_token_ids]
    if len(banned) > cfg.max_banned_ids or any(not 0 <= i < mcfg.vocab_size for i in banned):
      raise ValueError(f"banned_token_ids {banned}: at most SamplerConfig.max_banned_ids={cfg.max_banned_ids} "
                       f"ids in [0, {mcfg.vocab_size})")
    if rng is None:
      if temperature > 0:
        raise ValueError("sampling with temperature > 0 needs rng=jax.random.key(...)")
      rng = jax.random.key(0)
    elif not jnp.issubdtype(getattr(rng, "dtype", np.uint32), jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    if jnp.ndim(rng) not in (0, 1) or (jnp.ndim(rng) == 1 and rng.shape[0] != B):
      raise ValueError(f"rng must be one key or one key per row ({B}), got key shape {rng.shape}")
    pad = mcfg.pad_token_id if pad_id is None else pad_id
    pad = 0 if pad is None else pad
    force = np.full((B, N), -1, np.int32)
    if force_tokens is not None:  # per row: ids to emit at steps 0, 1, ... (-1 = sample); rows may be ragged
      if len(force_tokens) != B:
        raise ValueError(f"force_tokens has {len(force_tokens)} rows for a batch of {B}")
      for b, f in enumerate(force_tokens):
        f = np.asarray(f, np.int64).reshape(-1)
        if len(f) > N or (f >= mcfg.vocab_size).any():
          raise ValueError(f"force_tokens row {b}: at most {N} ids below the vocabulary size {mcfg.vocab_size}")
        force[b, :len(f)] = np.maximum(f, -1)
    params = SamplingParams(
        temperature=jnp.float32(temperature), top_p=jnp.float32(top_p), top_k=jnp.int32(top_k),
        max_new_tokens=jnp.int32(max_new_tokens), pad_id=jnp.int32(pad),
        close_id=jnp.int32(-1 if close_token_id is None else close_token_id),
        banned_K=jnp.asarray(banned + [-1] * (cfg.max_banned_ids - len(banned)), jnp.int32))
    return dict(params=params, eos_E=jnp.asarray(eos + [-1] * (cfg.max_eos_ids - len(eos)), jnp.int32),
                stops=self.compile_stops(stop), force_BN=jnp.asarray(force), rng=rng)

  def _finish(self, outs, cache, max_new_tokens, t0, t1):
    tokens, logp, lengths, reasons, close = jax.device_get(outs)
    end = int(jax.device_get(cache.end))
    t2 = time.perf_counter()
    out = SampleOutput(tokens=np.asarray(tokens)[:, :max_new_tokens], logprobs=np.asarray(logp)[:, :max_new_tokens],
                       lengths=np.asarray(lengths), stop_reasons=np.asarray(reasons),
                       close_logprobs=np.asarray(close), prep_s=t1 - t0, device_s=t2 - t1)
    return out, Conversation(cache=cache, end=end)


def split_hf_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, image_token_id: int,
                    merge_unit: int) -> tuple[list[np.ndarray], list[RowImages | None] | None]:
  """HF-style padded batch (+ pixel_values/grids flattened in (batch, sequence) order) -> per-row inputs."""
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
  mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
  if mask.shape != ids.shape:
    raise ValueError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
  rows = [ids[b][mask[b] > 0] for b in range(ids.shape[0])]
  if pixel_values is None:
    if any((r == image_token_id).any() for r in rows):
      raise ValueError("input_ids contain <|image_pad|> tokens but no pixel_values were given")
    return rows, None
  if image_grid_thw is None:
    raise ValueError("pixel_values given without image_grid_thw")
  grid = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  pv = np.asarray(pixel_values)
  if pv.shape[0] != num_patches(grid):
    raise ValueError(f"pixel_values has {pv.shape[0]} patches, image_grid_thw {grid.tolist()} needs "
                     f"{num_patches(grid)}")
  images, img, off = [], 0, 0
  for b, r in enumerate(rows):
    is_img = r == image_token_id
    n_blocks = int((is_img & ~np.concatenate([[False], is_img[:-1]])).sum())
    if img + n_blocks > len(grid):
      raise ValueError(f"row {b}: more image blocks in input_ids than grids in image_grid_thw")
    g = grid[img:img + n_blocks]
    n = num_patches(g)
    images.append((pv[off:off + n], g) if n_blocks else None)
    img, off = img + n_blocks, off + n
  if img != len(grid):
    raise ValueError(f"image_grid_thw has {len(grid)} images but input_ids hold {img} image blocks")
  return rows, images


def generate(model: Qwen25VL, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
             max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             eos_token_ids: Sequence[int] | int | None = None, rng=None, stop: Sequence[Any] = (),
             tokenizer=None, pad_token_id: int | None = None,
             sampler_config: SamplerConfig = SamplerConfig()) -> SampleOutput:
  """HF-like one-shot generation; returns `SampleOutput` (use `.tokens` [B, max_new_tokens] and
  `.logprobs` [B, max_new_tokens]; also `.lengths`, `.stop_reasons`).

  `input_ids`/`attention_mask` may be left or right padded (each row's masked tokens are its prompt).
  `pixel_values` [sum patches, 1176] and `image_grid_thw` [images, 3] are HF's flattened layout.
  Tokens after a row's EOS (kept) are `pad_token_id` (default: the model config's, else 0). Log-probs are
  of the temperature-scaled full distribution (see `sampling.logits`). Text stop rules need `tokenizer`.
  For repeated calls or multi-turn use a `Sampler` (this builds one per call).
  """
  rows, images = split_hf_inputs(input_ids, attention_mask, pixel_values, image_grid_thw,
                                 model.cfg.image_token_id, model.cfg.vision.merge_unit)
  sampler = Sampler(model, sampler_config, tokenizer=tokenizer)
  out, _ = sampler.start(rows, images, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                         top_k=top_k, eos_token_ids=eos_token_ids, stop=stop, pad_id=pad_token_id, rng=rng)
  return out
