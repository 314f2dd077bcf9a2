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


def test_flattened_images_attend_per_row_of_whole_images():
  """`prepare_vision_images` packs whole images in order into rows (never splitting one), and the tower's
  features over those rows equal those of all images encoded as one masked sequence, in HF order."""
  from flax import nnx

  from mgpo_jax.models.qwen2_5_vl.config import VisionConfig
  from mgpo_jax.models.qwen2_5_vl.vision import VisionTower, pack_images, prepare_vision_images, prepare_vision_inputs

  assert pack_images([(1, 4, 4), (1, 4, 8), (1, 8, 8), (1, 4, 4), (1, 2, 4)], capacity=64) == [[0, 1], [2], [3, 4]]
  cfg = VisionConfig(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=8,
                     fullatt_block_indexes=(1,))
  tower = VisionTower(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
  grids = [(1, 8, 12), (1, 4, 4), (1, 2, 6), (1, 10, 8)]
  rng = np.random.default_rng(0)
  sizes = [t * h * w for t, h, w in grids]
  pv = rng.standard_normal((sum(sizes), cfg.patch_dim)).astype(np.float32)
  vision = prepare_vision_images(pv, np.array(grids), cfg, num_rows=4)
  assert vision.pixels_PC.shape[:2] == (4, 96)  # rows [96], [16 12], [80], one empty row (num_rows)
  feats = np.asarray(nnx.jit(lambda t, v: jax.vmap(t)(v))(tower, vision))
  # Reference: all images as one sequence, kept apart only by the mask (the costly layout).
  one_seq = np.asarray(nnx.jit(lambda t, v: t(v))(tower, prepare_vision_inputs(pv, np.array(grids), cfg)))
  ends = np.cumsum([n // cfg.merge_unit for n in sizes])
  np.testing.assert_allclose(feats[0, :ends[0]], one_seq[:ends[0]], atol=1e-5)
  np.testing.assert_allclose(feats[1, :ends[2] - ends[0]], one_seq[ends[0]:ends[2]], atol=1e-5)
  np.testing.assert_allclose(feats[2, :ends[3] - ends[2]], one_seq[ends[2]:], atol=1e-5)
