"""Logits parity of our Flax Qwen2.5-VL against transformers (eager, float32, every parameter random)."""

import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as R
from mgpo_jax.models import qwen2_5_vl

TOL = 1e-4


@pytest.fixture(scope="module")
def ours_untied(ref_untied):
  return qwen2_5_vl.from_pretrained(ref_untied[0])


@pytest.fixture(scope="module")
def ours_tied(ref_tied):
  return qwen2_5_vl.from_pretrained(ref_tied[0])


def left_pad(rows, pad_id):
  T = max(len(r) for r in rows)
  ids = np.full((len(rows), T), pad_id, np.int64)
  mask = np.zeros((len(rows), T), np.int64)
  for i, r in enumerate(rows):
    ids[i, T - len(r):] = r
    mask[i, T - len(r):] = 1
  return ids, mask


def compare(ours, ref, ids, mask=None, pv=None, grid=None):
  a = np.asarray(ours(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=grid))
  b = R.hf_logits(ref, ids, mask, pv, grid)
  m = np.ones(ids.shape, bool) if mask is None else mask.astype(bool)
  err = float(np.abs(a - b)[m].max())
  print(f"max abs diff {err:.2e} (logit scale {np.abs(b[m]).max():.2f})")
  assert err <= TOL, err
  return err


def test_text_only_batch_left_padding(ref_untied, ours_untied):
  rng = np.random.default_rng(0)
  ids, mask = left_pad([rng.integers(0, 280, 13), rng.integers(0, 280, 7)], pad_id=0)
  compare(ours_untied, ref_untied[1], ids, mask)


# "chunked": 1280 patches > vision.ATTENTION_CHUNK, so the vision tower attends in query chunks.
@pytest.mark.parametrize("grid", [(1, 20, 12), (1, 16, 16), (1, 4, 6), (1, 10, 34), (1, 32, 40)],
                         ids=["several_windows", "divisible_by_window", "single_window", "wide", "chunked"])
def test_one_image(ref_untied, ours_untied, grid):
  rng = np.random.default_rng(1)
  ids = np.array([R.image_prompt([grid])])
  compare(ours_untied, ref_untied[1], ids, None, R.random_pixels([grid], rng), np.array([grid]))


def test_two_images_of_different_sizes_in_one_sample(ref_untied, ours_untied):
  rng = np.random.default_rng(2)
  grids = [(1, 12, 20), (1, 8, 6)]
  ids = np.array([R.image_prompt(grids, rng=rng)])
  compare(ours_untied, ref_untied[1], ids, None, R.random_pixels(grids, rng), np.array(grids))


def test_batch_left_padding_different_numbers_of_images(ref_untied, ours_untied):
  rng = np.random.default_rng(3)
  g0, g1 = [(1, 8, 10)], [(1, 6, 4), (1, 12, 8)]
  ids, mask = left_pad([R.image_prompt(g0, rng=rng), R.image_prompt(g1, rng=rng, text_before=(5,))],
                       pad_id=0)
  grids = np.array(g0 + g1)
  compare(ours_untied, ref_untied[1], ids, mask, R.random_pixels(g0 + g1, rng), grids)


def test_flattened_batch_of_images_of_different_sizes(ref_untied, ours_untied):
  """Five images of different sizes over three input rows in one flattened call: the vision tower runs on
  rows of whole images (four images share the first, from different input rows; the largest has its own),
  and every logit still matches transformers, whose attention stays within each image (cu_seqlens)."""
  rng = np.random.default_rng(7)
  g0, g1, g2 = [(1, 8, 10)], [(1, 6, 4), (1, 12, 8)], [(1, 4, 4), (1, 16, 16)]
  vision = qwen2_5_vl.prepare_vision_images(R.random_pixels(g0 + g1 + g2, rng), np.array(g0 + g1 + g2),
                                            ours_untied.cfg.vision)
  assert vision.flat_order and vision.pixels_PC.shape[:2] == (2, 256)  # rows: [80 24 96 16], [256]
  ids, mask = left_pad([R.image_prompt(g, rng=rng, text_before=(5,) * (i + 1)) for i, g in enumerate((g0, g1, g2))],
                       pad_id=0)
  grids = np.array(g0 + g1 + g2)
  compare(ours_untied, ref_untied[1], ids, mask, R.random_pixels(g0 + g1 + g2, rng), grids)


def test_tied_embeddings_and_new_config_spelling(ref_tied, ours_tied):
  assert ours_tied.cfg.tie_word_embeddings and not hasattr(ours_tied, "lm_head")
  rng = np.random.default_rng(4)
  grids = [(1, 8, 12)]
  ids = np.array([R.image_prompt(grids)])
  compare(ours_tied, ref_tied[1], ids, None, R.random_pixels(grids, rng), np.array(grids))


def test_bfloat16_forward_stays_close(ref_untied, ours_untied):
  ours_bf16 = qwen2_5_vl.from_pretrained(ref_untied[0], dtype=jnp.bfloat16)
  assert ours_bf16.q[...].dtype == jnp.bfloat16
  rng = np.random.default_rng(5)
  grids = [(1, 8, 12)]
  ids = np.array([R.image_prompt(grids)])
  pv = R.random_pixels(grids, rng)
  a = np.asarray(ours_bf16(ids, pixel_values=pv, image_grid_thw=np.array(grids)))
  b = R.hf_logits(ref_untied[1], ids, None, pv, np.array(grids))
  err = np.abs(a - b).max()
  print(f"bf16 vs f32 reference: max abs diff {err:.3f}")
  assert np.isfinite(a).all() and err < 0.15  # bf16 has ~3 significant digits; logits are O(4)
  assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.8


def test_positions_and_rope_deltas_match_hf(ref_untied, ours_untied):
  import torch
  rng = np.random.default_rng(6)
  g0, g1 = [(1, 8, 10)], [(1, 6, 4), (1, 12, 8)]
  ids, mask = left_pad([R.image_prompt(g0, rng=rng), R.image_prompt(g1, rng=rng, text_before=(5,))], 0)
  grids = np.array(g0 + g1)
  t_ids = torch.as_tensor(ids)
  pos_hf, delta_hf = ref_untied[1].model.get_rope_index(
      t_ids, mm_token_type_ids=(t_ids == R.IMAGE_TOKEN).int(), image_grid_thw=torch.as_tensor(grids),
      attention_mask=torch.as_tensor(mask))
  pos, next_pos = qwen2_5_vl.rope_index(ids, mask, grids, ours_untied.cfg)
  np.testing.assert_array_equal(np.asarray(pos)[:, mask.astype(bool)], pos_hf.numpy()[:, mask.astype(bool)])
  # HF's generate continues at (number of real tokens) + rope_delta (its text positions are mask cumsums).
  np.testing.assert_array_equal(np.asarray(next_pos), mask.sum(1) + delta_hf.numpy()[:, 0])
