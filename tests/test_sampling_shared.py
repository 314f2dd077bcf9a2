"""Shared prompts (SamplerConfig.share_prompts): each distinct prompt prefilled once, its rows decoding from
copies of its cache, give the same samples as prefilling every row (float32)."""

import dataclasses

import jax
import numpy as np
import pytest

import hf_reference as R
from mgpo_jax import sampling
from mgpo_jax.models import qwen2_5_vl
from mgpo_jax.sampling.sampler import _distinct_rows

CFG = sampling.SamplerConfig(prompt_buckets=(32, 64), new_token_buckets=(8,), patch_buckets=(64, 128),
                             image_buckets=(1, 2), cache_buckets=(128, 256), max_top_k=8)
EOS = 299


@pytest.fixture(scope="module")
def samplers(ref_untied):
  model = qwen2_5_vl.from_pretrained(ref_untied[0])
  return {share: sampling.Sampler(model, dataclasses.replace(CFG, share_prompts=share)) for share in (True, False)}


def _groups(rng):
  """Three prompts (mixed image sizes, unequal lengths -> left padding) in interleaved rows: 8 rows.

  Prompt 0's rows carry the same pixel array; prompt 2's carry equal copies (compared by value)."""
  grids = [[(1, 4, 4)], [(1, 4, 8)], [(1, 6, 4)]]
  prompts = [R.image_prompt(g, rng=rng, text_before=tuple(rng.integers(10, 280, n)))
             for g, n in zip(grids, (3, 9, 1))]
  pixels = [R.random_pixels(g, rng) for g in grids]
  which = [0, 1, 2, 0, 2, 1, 0, 2]
  rows = [prompts[p] for p in which]
  images = [(pixels[p] if p != 2 else pixels[p].copy(), np.array(grids[p])) for p in which]
  return rows, images, which


def test_distinct_rows_finds_the_prompts():
  rng = np.random.default_rng(0)
  rows, images, which = _groups(rng)
  uniq, uimages, row_of = _distinct_rows(rows, images)
  assert len(uniq) == 4 and len(uniq[3]) == 0 and uimages[3] is None  # 3 prompts padded to 4 rows
  np.testing.assert_array_equal(row_of, which)
  # Same tokens, different pixels: not the same prompt.
  other = list(images)
  other[3] = (images[3][0] + 1.0, images[3][1])
  assert _distinct_rows(rows, other)[2].tolist() == [0, 1, 2, 3, 2, 1, 0, 2]
  assert _distinct_rows(rows[:3], images[:3])[2] is None  # nothing repeated: nothing to share


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_shared_equals_unshared_over_two_turns(samplers, temperature):
  rng = np.random.default_rng(1)
  rows, images, _ = _groups(rng)
  B = len(rows)
  keys = jax.random.split(jax.random.key(5), B)
  kw = dict(temperature=temperature, eos_token_ids=[EOS], close_token_id=298)
  # Turn 2 differs per row: its own text and its own crop (two sizes).
  g2 = [[(1, 4, 4)] if b % 2 else [(1, 2, 4)] for b in range(B)]
  turn2 = [[298] + R.image_prompt(g, text_before=tuple(rng.integers(10, 280, 1 + b % 3))) for b, g in enumerate(g2)]
  crops = [(R.random_pixels(g, rng), np.array(g)) for g in g2]
  outs = {}
  for share, s in samplers.items():
    out1, conv = s.start(rows, images, max_new_tokens=6, rng=keys, reserve=64, **kw)
    out2, conv = s.extend(conv, turn2, crops, max_new_tokens=5, rng=jax.random.split(jax.random.key(6), B), **kw)
    outs[share] = (out1, out2)
  for a, b in zip(outs[True], outs[False]):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    np.testing.assert_allclose(a.close_logprobs, b.close_logprobs, atol=1e-5)
  if temperature > 0:  # rows of one prompt still draw their own samples (their own keys)
    t1 = outs[True][0].tokens
    assert not (np.array_equal(t1[0], t1[3]) and np.array_equal(t1[0], t1[6]))


def test_shared_text_only_rows_match(samplers):
  """Text-only prompts (no vision inputs at all), one key for the batch."""
  rng = np.random.default_rng(2)
  p = [list(rng.integers(10, 280, n)) for n in (5, 12)]
  rows = [p[0], p[1], p[1], p[0], p[1]]
  outs = [s.start(rows, max_new_tokens=8, temperature=1.0, rng=jax.random.key(3), eos_token_ids=[EOS])[0]
          for s in samplers.values()]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
