"""Per-token log-probs and entropies from the last hidden states, without [B, T, V] f32 logits.

Chunking choice: we loop (``lax.scan``) over chunks of the SEQUENCE, each chunk seeing the full
vocabulary, rather than over chunks of the vocabulary with an online logsumexp. For a 152k vocab
on TPU this is the better trade:
* SPMD: the LM head is usually sharded along V (tensor parallel) and the batch along B. Slicing
  T keeps both intact; the per-chunk logsumexp over the V-sharded axis is one small all-reduce.
  Slicing V inside a scan would cut across the weight's shards and make XLA gather or permute it.
* Exactness and simplicity: one exact softmax per chunk, no online rescaling, no -inf padding of
  V (152,064 = 128 * 1188 is MXU aligned; padding T with zero hidden states is harmless).
* MXU efficiency: each step is a [B*C, D] x [D, V] matmul; re-reading the LM head once per chunk
  costs ~2*B*C flops per weight byte, far above the TPU's compute/bandwidth ridge for C ~ 1k.
Peak extra memory is one chunk of f32 logits, B_local * chunk_size * V * 4 bytes (~0.6 GB for
B_local=1, chunk_size=1024, V=152k): lower ``chunk_size`` if needed.

The gradient is a ``jax.custom_vjp``: the backward pass recomputes each chunk's logits (nothing
[B, T, V] is saved), forms d logits in closed form from the saved logsumexp and entropy, and
accumulates the LM-head gradient in float32 across chunks (autodiff through a scan would
accumulate it in the weight's dtype, i.e. bf16, once per chunk). The backward matmuls take
d logits cast to the compute dtype (bf16 inputs -> bf16 MXU matmul with f32 accumulation).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp


def shift_targets(input_ids_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token targets: the logits at position t predict ``input_ids[t + 1]``.

  Returns ``(targets_BT, valid_BT)``; the last position has no target (target 0, valid False).
  """
  if jnp.ndim(input_ids_BT) != 2:
    raise ValueError(f"input_ids_BT must be rank 2 [B, T], got shape {jnp.shape(input_ids_BT)}.")
  input_ids_BT = jnp.asarray(input_ids_BT)
  targets_BT = jnp.pad(input_ids_BT[:, 1:], ((0, 0), (0, 1)))
  valid_BT = jnp.arange(input_ids_BT.shape[1]) < input_ids_BT.shape[1] - 1
  return targets_BT, jnp.broadcast_to(valid_BT, input_ids_BT.shape)


def _chunk_logits(h_BCD, w_DV, temperature):
  logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV, preferred_element_type=jnp.float32)
  return logits_BCV / temperature if temperature != 1.0 else logits_BCV


def _target_logits(logits_BCV, t_BC):
  # Compare-with-iota + reduce instead of a gather: fuses with the reduction and partitions
  # cleanly when V is sharded.
  hit_BCV = jax.lax.broadcasted_iota(jnp.int32, logits_BCV.shape, 2) == t_BC[..., None]
  return hit_BCV, jnp.sum(jnp.where(hit_BCV, logits_BCV, 0.0), axis=-1)


def _to_chunks(x_BT_, num_chunks, chunk):
  """[B, T, ...] (T = num_chunks * chunk) -> [num_chunks, B, chunk, ...]."""
  x = x_BT_.reshape(x_BT_.shape[0], num_chunks, chunk, *x_BT_.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _from_chunks(x_NBC_, length):
  x = jnp.moveaxis(x_NBC_, 0, 1)
  x = x.reshape(x.shape[0], -1, *x.shape[3:])
  return x[:, :length]


def _pad_time(x_BT_, padded_len):
  pad = padded_len - x_BT_.shape[1]
  if pad == 0:
    return x_BT_
  return jnp.pad(x_BT_, ((0, 0), (0, pad)) + ((0, 0),) * (x_BT_.ndim - 2))


def _forward(hidden_BTD, lm_head_DV, targets_BT, chunk, compute_entropy, temperature):
  """Returns logp, entropy (zeros if not computed) and logsumexp, all f32 [B, T]."""
  B, T, _ = hidden_BTD.shape
  n = -(-T // chunk)
  h_NBCD = _to_chunks(_pad_time(hidden_BTD, n * chunk), n, chunk)
  t_NBC = _to_chunks(_pad_time(targets_BT, n * chunk), n, chunk)

  def step(_, xs):
    h_BCD, t_BC = xs
    logits_BCV = _chunk_logits(h_BCD, lm_head_DV, temperature)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    _, tgt_BC = _target_logits(logits_BCV, t_BC)
    if compute_entropy:
      # H = sum_v p_v (lse - z_v): every term >= 0, no cancellation between large numbers.
      p_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
      ent_BC = jnp.sum(p_BCV * (lse_BC[..., None] - logits_BCV), axis=-1)
    else:
      ent_BC = jnp.zeros_like(lse_BC)
    return None, (tgt_BC - lse_BC, ent_BC, lse_BC)

  _, outs = jax.lax.scan(step, None, (h_NBCD, t_NBC))
  return tuple(_from_chunks(o, T) for o in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _logprobs_entropy(hidden_BTD, lm_head_DV, targets_BT, chunk, compute_entropy, temperature):
  logp_BT, ent_BT, _ = _forward(hidden_BTD, lm_head_DV, targets_BT, chunk, compute_entropy,
                                temperature)
  return logp_BT, ent_BT


def _logprobs_entropy_fwd(hidden_BTD, lm_head_DV, targets_BT, chunk, compute_entropy,
                          temperature):
  logp_BT, ent_BT, lse_BT = _forward(hidden_BTD, lm_head_DV, targets_BT, chunk, compute_entropy,
                                     temperature)
  return (logp_BT, ent_BT), (hidden_BTD, lm_head_DV, targets_BT, lse_BT, ent_BT)


def _logprobs_entropy_bwd(chunk, compute_entropy, temperature, res, cts):
  hidden_BTD, lm_head_DV, targets_BT, lse_BT, ent_BT = res
  g_logp_BT, g_ent_BT = cts
  B, T, _ = hidden_BTD.shape
  n = -(-T // chunk)
  to_chunks = lambda x: _to_chunks(_pad_time(x, n * chunk), n, chunk)
  compute_dtype = jnp.result_type(hidden_BTD.dtype, lm_head_DV.dtype)
  # Padded positions get zero cotangents, so they add nothing to either gradient.
  xs = tuple(to_chunks(x) for x in (hidden_BTD, targets_BT, lse_BT, ent_BT,
                                    g_logp_BT.astype(jnp.float32), g_ent_BT.astype(jnp.float32)))

  def step(dw_DV, xs):
    h_BCD, t_BC, lse_BC, ent_BC, g_logp_BC, g_ent_BC = xs
    logits_BCV = _chunk_logits(h_BCD, lm_head_DV, temperature)
    p_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    hit_BCV, _ = _target_logits(logits_BCV, t_BC)
    # d logp / d z = onehot - p.
    dz_BCV = g_logp_BC[..., None] * (hit_BCV.astype(jnp.float32) - p_BCV)
    if compute_entropy:
      # d H / d z_v = p_v (E_p[z] - z_v), with E_p[z] = lse - H.
      mean_z_BC = lse_BC - ent_BC
      dz_BCV = dz_BCV + g_ent_BC[..., None] * p_BCV * (mean_z_BC[..., None] - logits_BCV)
    if temperature != 1.0:
      dz_BCV = dz_BCV / temperature
    dz_BCV = dz_BCV.astype(compute_dtype)
    dh_BCD = jnp.einsum("bcv,dv->bcd", dz_BCV, lm_head_DV.astype(compute_dtype),
                        preferred_element_type=jnp.float32)
    dw_DV = dw_DV + jnp.einsum("bcd,bcv->dv", h_BCD.astype(compute_dtype), dz_BCV,
                               preferred_element_type=jnp.float32)
    return dw_DV, dh_BCD.astype(hidden_BTD.dtype)

  dw_DV, dh_NBCD = jax.lax.scan(step, jnp.zeros(lm_head_DV.shape, jnp.float32), xs)
  return _from_chunks(dh_NBCD, T), dw_DV.astype(lm_head_DV.dtype), None


_logprobs_entropy.defvjp(_logprobs_entropy_fwd, _logprobs_entropy_bwd)


def token_logprobs_and_entropy(
    hidden_BTD: jax.Array,
    lm_head_DV: jax.Array,
    targets_BT: jax.Array,
    *,
    chunk_size: int = 1024,
    compute_entropy: bool = True,
    temperature: float = 1.0,
) -> tuple[jax.Array, jax.Array | None]:
  """Log-prob of each target token and entropy of softmax(hidden @ lm_head / temperature).

  Args:
    hidden_BTD: final hidden states (f32 or bf16).
    lm_head_DV: output projection [D, V] (for tied embeddings pass ``embedding_VD.T``).
    targets_BT: target token ids in ``[0, V)`` (see ``shift_targets``); other ids give
      meaningless (finite) values, so mask those positions downstream.
    chunk_size: sequence positions per chunk (per row); bounds the f32 logits to
      ``[B, chunk_size, V]``.
    compute_entropy: if False, skip the entropy (returned as None).
    temperature: sampling temperature the rollouts used (logits are divided by it).

  Returns:
    ``(logp_BT, entropy_BT)`` in float32; differentiable w.r.t. hidden and lm_head.
  """
  if jnp.ndim(hidden_BTD) != 3:
    raise ValueError(f"hidden_BTD must be rank 3 [B, T, D], got shape {jnp.shape(hidden_BTD)}.")
  if jnp.ndim(lm_head_DV) != 2 or jnp.shape(lm_head_DV)[0] != jnp.shape(hidden_BTD)[2]:
    raise ValueError(
        f"lm_head_DV must be [D={jnp.shape(hidden_BTD)[2]}, V], got shape {jnp.shape(lm_head_DV)}."
    )
  if jnp.shape(targets_BT) != jnp.shape(hidden_BTD)[:2]:
    raise ValueError(
        f"targets_BT shape {jnp.shape(targets_BT)} != hidden_BTD[:2] {jnp.shape(hidden_BTD)[:2]}."
    )
  if not jnp.issubdtype(jnp.result_type(targets_BT), jnp.integer):
    raise ValueError(f"targets_BT must be integer token ids, got {jnp.result_type(targets_BT)}.")
  for name, x in (("hidden_BTD", hidden_BTD), ("lm_head_DV", lm_head_DV)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"{name} must be floating point, got {jnp.result_type(x)}.")
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature!r}.")
  T = jnp.shape(hidden_BTD)[1]
  chunk = max(1, min(int(chunk_size), T))
  logp_BT, ent_BT = _logprobs_entropy(
      jnp.asarray(hidden_BTD), jnp.asarray(lm_head_DV), jnp.asarray(targets_BT, jnp.int32),
      chunk, bool(compute_entropy), float(temperature))
  return logp_BT, (ent_BT if compute_entropy else None)
