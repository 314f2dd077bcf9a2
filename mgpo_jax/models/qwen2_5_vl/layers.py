"""Small pure building blocks shared by the vision tower and the text decoder.

Shape letters: B batch, T query length, S key length, D model dim, N query heads, K kv heads,
G heads per kv head, H head dim, F mlp dim, V vocab, P patches, L layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# A finite "minus infinity": fully masked rows (left padding) get a uniform softmax instead of NaN,
# like transformers' additive min-float mask.
NEG_INF = float(jnp.finfo(jnp.float32).min)


def param(rngs: nnx.Rngs, shape, axes, dtype, scale: float = 0.02, init: str = "normal") -> nnx.Param:
  """A parameter with logical sharding axes; `init` is normal(scale), 'ones' or 'zeros'."""
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, axes=tuple(axes))


def rms_norm(x, weight, eps: float):
  """HF order: normalise in float32, cast back to the input dtype, then multiply by the weight."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * x32.astype(x.dtype)


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
  """Rotary embedding in float32 (halves, not interleaved); cos/sin broadcast against x."""
  x32 = x.astype(jnp.float32)
  return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS, scale: float):
  """Grouped-query softmax attention; scores and softmax in float32."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH,
                       preferred_element_type=jnp.float32) * scale
  s_BKGTS = jnp.where(mask_BTS[:, None, None], s_BKGTS, NEG_INF)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
  o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS, v_BSKH)
  return o_BTKGH.reshape(B, T, N, H)


def swiglu(x, gate, up, down, gate_b=None, up_b=None, down_b=None):
  g = x @ gate
  u = x @ up
  if gate_b is not None:
    g, u = g + gate_b, u + up_b
  y = (jax.nn.silu(g) * u) @ down
  return y + down_b if down_b is not None else y
