"""Next-token choice from logits: temperature, top-k, top-p, greedy, all with traced settings.

Order as in transformers' warpers: temperature, then top-k, then top-p. `temperature <= 0` means greedy
(argmax of the raw logits). The returned log-prob is that of the chosen token under the
temperature-scaled FULL distribution, `log_softmax(logits / T)` (T = 1 for greedy), i.e. before the
top-k / top-p truncation and the banned ids: this is exactly what the learner recomputes (`rl.logprobs`
with the same temperature), so the PPO ratio is 1 before the first update. With top_p = 1, top_k = 0
(the MGPO setting) and no banned ids it is also the distribution actually sampled from.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

_MASKED = -jnp.inf


@flax.struct.dataclass
class SamplingParams:
  """Per-call sampling settings; all traced, so a new value never recompiles."""

  temperature: jax.Array     # f32 []: <= 0 is greedy
  top_p: jax.Array           # f32 []: 1 = off
  top_k: jax.Array           # i32 []: 0 = off; at most SamplerConfig.max_top_k
  max_new_tokens: jax.Array  # i32 []
  pad_id: jax.Array          # i32 []: written after a row has stopped
  close_id: jax.Array        # i32 []: token whose log-prob after the last token is reported; -1 = none
  banned_K: jax.Array        # i32 [K]: ids never sampled (-1 = empty slot)


def top_k_mask(logits_BV, top_k, max_top_k: int):
  """Keeps the `top_k` largest logits (ties with the k-th kept too); `top_k` is traced, <= max_top_k."""
  vals_BK, _ = jax.lax.top_k(logits_BV, max_top_k)
  k = jnp.clip(top_k, 1, max_top_k)
  thresh_B1 = jnp.take(vals_BK, k - 1, axis=1)[:, None]
  return jnp.where(logits_BV >= thresh_B1, logits_BV, _MASKED)


def top_p_mask(logits_BV, top_p):
  """Keeps the smallest set of most likely tokens whose probability reaches `top_p` (at least one)."""
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  p_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(p_BV, axis=-1) - p_BV  # mass strictly before each sorted token
  keep_BV = before_BV < top_p
  n_keep_B = jnp.maximum(keep_BV.sum(axis=-1), 1)
  thresh_B1 = jnp.take_along_axis(sorted_BV, (n_keep_B - 1)[:, None], axis=-1)
  return jnp.where(logits_BV >= thresh_B1, logits_BV, _MASKED)


def filter_logits(scaled_BV, top_k, top_p, max_top_k: int):
  """Top-k then top-p on temperature-scaled logits; each filter is skipped at run time when off."""
  if max_top_k > 0:
    scaled_BV = jax.lax.cond(top_k > 0, lambda x: top_k_mask(x, top_k, max_top_k), lambda x: x, scaled_BV)
  return jax.lax.cond(top_p < 1.0, lambda x: top_p_mask(x, top_p), lambda x: x, scaled_BV)


def first_argmax(x_BV):
  """argmax over the last axis (first index on ties) as max + min-index: two plain reductions, which
  XLA:CPU runs several times faster than the variadic (value, index) reduce of `jnp.argmax`."""
  V = x_BV.shape[-1]
  iota_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
  hit_BV = x_BV == jnp.max(x_BV, axis=-1, keepdims=True)
  return jnp.minimum(jnp.min(jnp.where(hit_BV, iota_BV, V), axis=-1), V - 1)


def choose(logits_BV, params: SamplingParams, key, max_top_k: int, forced_B=None):
  """Chosen tokens [B] and their log-probs [B] (see the module docstring for which distribution).

  Where `forced_B >= 0` that token is taken instead of a sample (teacher forcing); its log-prob is still
  the model's.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  greedy = params.temperature <= 0
  t = jnp.where(greedy, 1.0, params.temperature)
  scaled_BV = logits_BV / t
  logp_BV = jax.nn.log_softmax(scaled_BV, axis=-1)
  V = logits_BV.shape[-1]
  banned_K = jnp.where(params.banned_K >= 0, params.banned_K, V)  # V: out of range, dropped
  scaled_BV = scaled_BV.at[:, banned_K].set(_MASKED, mode="drop")

  def sample():
    filtered_BV = filter_logits(scaled_BV, params.top_k, params.top_p, max_top_k)
    if jnp.ndim(key) == 1:  # one key per row: a row's sample does not depend on the rest of the batch
      gumbel_BV = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(key)
    else:
      gumbel_BV = jax.random.gumbel(key, filtered_BV.shape, jnp.float32)
    return first_argmax(filtered_BV + gumbel_BV)  # = jax.random.categorical, cheaper on CPU

  # Greedy decoding draws no noise (a vocabulary-sized random draw per step is not free).
  tok_B = jax.lax.cond(greedy, lambda: first_argmax(scaled_BV), sample).astype(jnp.int32)
  if forced_B is not None:
    tok_B = jnp.where(forced_B >= 0, forced_B, tok_B)
  return tok_B, jnp.take_along_axis(logp_BV, tok_B[:, None], axis=-1)[:, 0]


def token_logprob(logits_BV, params: SamplingParams, token_B):
  """log_softmax(logits / T)[token] (T = 1 for greedy), the same distribution as `choose` reports."""
  t = jnp.where(params.temperature <= 0, 1.0, params.temperature)
  logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / t, axis=-1)
  return jnp.take_along_axis(logp_BV, jnp.clip(token_B, 0)[:, None], axis=-1)[:, 0]
