"""Chunked vision attention (no [P, P] scores) equals dense masked attention, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgpo_jax.models.qwen2_5_vl.layers import attention
from mgpo_jax.models.qwen2_5_vl.vision import chunked_attention


def _segments(rng, P, max_len, pad):
  """Contiguous runs of 1..max_len patches (windows in window order), then `pad` padding patches."""
  seg, i = [], 0
  while len(seg) < P - pad:
    seg += [i] * int(min(rng.integers(1, max_len + 1), P - pad - len(seg)))
    i += 1
  return np.asarray(seg + [-1] * pad, np.int32)


def _dense(q, k, v, seg, scale):
  return attention(q[None], k[None], v[None], (seg[:, None] == seg[None, :])[None], scale)[0]


@pytest.mark.parametrize("P,chunk,band,pad", [(100, 16, 8, 0), (100, 16, 8, 12), (64, 64, 8, 4), (64, 16, 8, 4),
                                               (37, 8, None, 5), (130, 32, None, 0)])
def test_chunked_equals_dense(P, chunk, band, pad):
  rng = np.random.default_rng(P + chunk)
  q, k, v = (jnp.asarray(rng.standard_normal((P, 2, 8)), jnp.float32) for _ in range(3))
  seg = jnp.asarray(_segments(rng, P, band or 40, pad))
  f = lambda q, k, v: chunked_attention(q, k, v, seg, 0.3, band=band, chunk=chunk)
  g = lambda q, k, v: _dense(q, k, v, seg, 0.3)
  real = np.asarray(seg) >= 0  # padding patches' outputs are never used
  np.testing.assert_allclose(np.asarray(f(q, k, v))[real], np.asarray(g(q, k, v))[real], atol=2e-6)
  w = jnp.asarray(rng.standard_normal((P, 2, 8)), jnp.float32) * real[:, None, None]
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)
  for a, b in zip(jax.grad(loss(f), (0, 1, 2))(q, k, v), jax.grad(loss(g), (0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=2e-5)


def test_no_patch_by_patch_scores_in_the_program():
  """The compiled window attention holds [chunk, chunk + 2 band] scores, not [P, P]."""
  P, chunk, band = 4096, 256, 64
  seg = jnp.arange(P, dtype=jnp.int32) // 64
  x = jax.ShapeDtypeStruct((P, 2, 8), jnp.float32)
  hlo = jax.jit(lambda q, k, v: chunked_attention(q, k, v, seg, 0.3, band=band, chunk=chunk)).lower(x, x, x).as_text()
  assert f"{P}x{P}" not in hlo and f"{chunk}x{chunk + 2 * band}" in hlo
