"""KV cache: prefill + step-by-step decode and chunked continuation reproduce the uncached forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as R
from mgpo_jax.models import qwen2_5_vl
from mgpo_jax.models.qwen2_5_vl import KVCache, prepare_vision_inputs, rope_index


@pytest.fixture(scope="module")
def model(ref_untied):
  return qwen2_5_vl.from_pretrained(ref_untied[0])


def test_prefill_then_decode_matches_uncached(model):
  rng = np.random.default_rng(0)
  grids = np.array([(1, 8, 12)])
  prompt = R.image_prompt(grids.tolist())
  full = prompt + list(rng.integers(10, 280, 6))
  ids = np.array([full, [0] * 3 + full[3:]])           # row 1: same tokens, 3 left pads
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  ids[1, :3] = 0
  pv = R.random_pixels(grids.tolist() * 2, rng)
  grids2 = np.concatenate([grids, grids])
  ids[1, 3:len(prompt)] = ids[0, 3:len(prompt)]
  expected = np.asarray(model(ids, mask, pv, grids2))
  P = len(prompt)
  vision = prepare_vision_inputs(pv, grids2, model.cfg.vision)
  cache = KVCache.init(model.cfg, batch=2, size=P + 10, dtype=jnp.float32)
  h, cache = model.extend(cache, ids[:, :P], mask[:, :P], vision, grids2)
  got = [np.asarray(model.logits(h))]
  step = jax.jit(lambda m, c, t, k: m.extend(c, t, k))
  for t in range(P, ids.shape[1]):
    h, cache = step(model, cache, ids[:, t:t + 1], mask[:, t:t + 1])
    got.append(np.asarray(model.logits(h)))
  got = np.concatenate(got, axis=1)
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], expected[valid], atol=1e-5)
  assert int(cache.end) == ids.shape[1]


def test_second_turn_chunk_with_new_image_matches_full_prefill(model):
  """Turn 2 appends (user text + a new image + header) to the cache of turn 1, rows of unequal length."""
  rng = np.random.default_rng(1)
  g1, g2 = [(1, 8, 8)], [(1, 6, 10)]
  turn1 = [R.image_prompt(g1) + list(rng.integers(10, 280, 4)), R.image_prompt(g1) + list(rng.integers(10, 280, 2))]
  turn2 = [R.image_prompt(g2, text_before=(11, 12)), R.image_prompt(g2, text_before=(13,))]
  pv1 = R.random_pixels(g1 * 2, rng)
  pv2 = R.random_pixels(g2 * 2, rng)
  # Incremental: chunk 1 left-padded, chunk 2 left-padded, both appended to the cache.
  def pad(rows):
    T = max(map(len, rows))
    ids = np.zeros((len(rows), T), np.int64)
    m = np.zeros_like(ids)
    for i, r in enumerate(rows):
      ids[i, T - len(r):], m[i, T - len(r):] = r, 1
    return ids, m
  ids1, m1 = pad(turn1)
  ids2, m2 = pad(turn2)
  cache = KVCache.init(model.cfg, batch=2, size=ids1.shape[1] + ids2.shape[1], dtype=jnp.float32)
  _, cache = model.extend(cache, ids1, m1, prepare_vision_inputs(pv1, np.array(g1 * 2), model.cfg.vision),
                          np.array(g1 * 2))
  h2, cache = model.extend(cache, ids2, m2, prepare_vision_inputs(pv2, np.array(g2 * 2), model.cfg.vision),
                           np.array(g2 * 2))
  inc = np.asarray(model.logits(h2))
  # Full prefill of each whole conversation (with holes = padding in the middle, as in the cache).
  ids = np.concatenate([ids1, ids2], 1)
  m = np.concatenate([m1, m2], 1)
  grids = np.array([g1[0], g2[0], g1[0], g2[0]])  # flattened (batch, sequence) order
  pv = np.concatenate([pv1[:len(pv1) // 2], pv2[:len(pv2) // 2], pv1[len(pv1) // 2:], pv2[len(pv2) // 2:]])
  full = np.asarray(model(ids, m, pv, grids))[:, ids1.shape[1]:]
  np.testing.assert_allclose(inc[m2.astype(bool)], full[m2.astype(bool)], atol=1e-5)
  # And the compacted conversation (no holes) gives the same positions.
  row = np.concatenate([ids1[1][m1[1] > 0], ids2[1][m2[1] > 0]])[None]
  pos_c, _ = rope_index(row, None, np.array([g1[0], g2[0]]), model.cfg)
  pos_h, _ = rope_index(ids[1:], m[1:], np.array([g1[0], g2[0]]), model.cfg)
  np.testing.assert_array_equal(np.asarray(pos_c)[:, 0], np.asarray(pos_h)[:, 0][:, m[1] > 0])


def test_batched_vision_layout_matches_flattened(model):
  """Per-row vision inputs (the sharding-friendly layout) give the same logits as HF's flattened one."""
  from mgpo_jax.models.qwen2_5_vl import prepare_vision_batch
  rng = np.random.default_rng(2)
  g0, g1 = [(1, 8, 10)], [(1, 6, 4), (1, 12, 8)]
  rows = [R.image_prompt(g0, rng=rng), R.image_prompt(g1, rng=rng, text_before=(5,)), [5, 6, 7, 8]]
  T = max(map(len, rows))
  ids = np.zeros((3, T), np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
  pv0, pv1 = R.random_pixels(g0, rng), R.random_pixels(g1, rng)
  expected = np.asarray(model(ids, mask, np.concatenate([pv0, pv1]), np.array(g0 + g1)))
  vision, grids = prepare_vision_batch([pv0, pv1, None], [np.array(g0), np.array(g1), None],
                                       model.cfg.vision, pad_to=256, max_images=3)
  pos, _ = rope_index(ids, mask, grids, model.cfg)
  h, _ = model.forward(jnp.asarray(ids), jnp.asarray(mask), pos, vision)
  got = np.asarray(model.logits(h))
  np.testing.assert_allclose(got[mask > 0], expected[mask > 0], atol=1e-5)


def test_unstacked_cache_decode_matches_the_stacked_scan(model):
  """The decode path with per-layer weights and KV buffers (unrolled layers) gives the logits and the cache
  of the layer scan over the stacked cache."""
  rng = np.random.default_rng(3)
  grids = np.array([(1, 4, 8)])
  prompt = R.image_prompt(grids.tolist())
  ids = np.array([prompt, prompt])
  mask = np.ones_like(ids)
  mask[1, :2] = 0
  vision = prepare_vision_inputs(R.random_pixels(grids.tolist() * 2, rng), np.concatenate([grids, grids]),
                                 model.cfg.vision)
  cache = KVCache.init(model.cfg, batch=2, size=ids.shape[1] + 8, dtype=jnp.float32)
  _, cache = model.extend(cache, ids, mask, vision, np.concatenate([grids, grids]))
  assert cache.k_LBKSH.shape == (model.cfg.num_layers, 2, model.cfg.num_kv_heads, cache.size, model.cfg.head_dim)
  stacked_step = jax.jit(lambda m, c, t, k: m.extend(c, t, k))
  unstacked_step = jax.jit(lambda m, c, t, k, w: m.extend(c, t, k, layers=w))
  layers = model.decoder_layers()
  flat = cache.unstack()
  assert not flat.stacked and len(flat.k_LBKSH) == model.cfg.num_layers
  for t, tok in enumerate(rng.integers(10, 280, (5, 2))):
    step_mask = np.array([[1], [int(t != 2)]])  # row 1 leaves a hole at step 2
    h_ref, cache = stacked_step(model, cache, tok[:, None], step_mask)
    h, flat = unstacked_step(model, flat, tok[:, None], step_mask, layers)
    np.testing.assert_allclose(np.asarray(model.logits(h)), np.asarray(model.logits(h_ref)), atol=1e-5)
  back = flat.stack()
  np.testing.assert_allclose(np.asarray(back.k_LBKSH), np.asarray(cache.k_LBKSH), atol=1e-6)
  np.testing.assert_allclose(np.asarray(back.v_LBKSH), np.asarray(cache.v_LBKSH), atol=1e-6)
  np.testing.assert_array_equal(np.asarray(back.mask_BS), np.asarray(cache.mask_BS))
  assert int(back.end) == int(cache.end) == ids.shape[1] + 5
  with pytest.raises(ValueError, match="unstacked cache has 1 layers"):
    model.extend(flat.replace(k_LBKSH=flat.k_LBKSH[:1], v_LBKSH=flat.v_LBKSH[:1]), tok[:, None], step_mask)


@pytest.mark.parametrize("D, F, w_dtype", [(8, 24, jnp.float32), (24, 8, jnp.float32), (16, 16, jnp.bfloat16)])
def test_mlp_matmul_custom_gradient_equals_autodiff(D, F, w_dtype):
  """`model._matmul` (the decoder MLP's matmul with a hand-written weight gradient) differentiates like x @ w."""
  from mgpo_jax.models.qwen2_5_vl.model import _matmul
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, F)), w_dtype)
  g = jnp.asarray(rng.normal(size=(2, 5, F)), jnp.float32)
  y, vjp = jax.vjp(_matmul, x, w)
  y_ref, vjp_ref = jax.vjp(lambda a, b: a @ b, x, w)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref))
  for got, want in zip(vjp(g), vjp_ref(g)):
    assert got.dtype == want.dtype and got.shape == want.shape
    rtol = 1e-2 if w_dtype == jnp.bfloat16 else 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=rtol, atol=1e-5)
