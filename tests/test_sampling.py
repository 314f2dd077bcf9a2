"""Sampler: HF greedy parity, stops, sampling filters, no recompilation, cache continuation."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import hf_reference as R
from mgpo_jax import sampling
from mgpo_jax.models import qwen2_5_vl
from mgpo_jax.sampling import StopReason, StopTokens

# Small buckets keep the number of compiled variants (and the test time) low.
CFG = sampling.SamplerConfig(prompt_buckets=(16, 32, 64), new_token_buckets=(8, 16), patch_buckets=(64, 128),
                             image_buckets=(1, 2), cache_buckets=(64, 128, 256), max_top_k=8)
EOS = 299  # never a prompt token below


@pytest.fixture(scope="module")
def model(ref_untied):
  return qwen2_5_vl.from_pretrained(ref_untied[0])


@pytest.fixture(scope="module")
def sampler(model):
  return sampling.Sampler(model, CFG)


def left_pad(rows):
  T = max(map(len, rows))
  ids = np.zeros((len(rows), T), np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
  return ids, mask


def hf_greedy(ref, ids, mask, max_new, pv=None, grid=None):
  kw = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
  if pv is not None:
    kw.update(pixel_values=torch.as_tensor(pv), image_grid_thw=torch.as_tensor(grid),
              mm_token_type_ids=(kw["input_ids"] == R.IMAGE_TOKEN).int())
  with torch.no_grad():
    out = ref.generate(**kw, max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
                       eos_token_id=EOS, pad_token_id=0)
  return out[:, ids.shape[1]:].numpy()


def full_logits(model, rows, images=None):
  """Uncached forward of whole sequences (right padded), the reference for every cached computation."""
  T = max(map(len, rows))
  ids = np.zeros((len(rows), T), np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, :len(r)], mask[i, :len(r)] = r, 1
  if images is None:
    return np.asarray(model(ids, mask))
  pv = np.concatenate([p for im in images for p in im[0]])
  grid = np.concatenate([g for im in images for g in im[1]])
  return np.asarray(model(ids, mask, pv, grid))


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ---------------------------------------------------------------------------------------------- HF parity
def test_greedy_matches_hf_text_left_padded(ref_untied, model):
  rng = np.random.default_rng(0)
  ids, mask = left_pad([rng.integers(0, 280, n) for n in (9, 14)])
  out = sampling.generate(model, ids, mask, max_new_tokens=10, eos_token_ids=[EOS], sampler_config=CFG)
  np.testing.assert_array_equal(out.tokens, hf_greedy(ref_untied[1], ids, mask, 10))
  assert out.tokens.shape == out.logprobs.shape == (2, 10)


def test_greedy_matches_hf_with_images_left_padded(ref_untied, model):
  rng = np.random.default_rng(1)
  grids = [(1, 4, 6), (1, 8, 4)]
  ids, mask = left_pad([R.image_prompt([grids[0]], rng=rng), R.image_prompt([grids[1]], text_before=(5,) * 6)])
  pv = R.random_pixels(grids, rng)
  out = sampling.generate(model, ids, mask, pv, np.array(grids), max_new_tokens=8, eos_token_ids=[EOS],
                          sampler_config=CFG)
  np.testing.assert_array_equal(out.tokens, hf_greedy(ref_untied[1], ids, mask, 8, pv, np.array(grids)))


# ---------------------------------------------------------------------------------------------- stops
def test_eos_per_row_pads_after_and_keeps_prefix(sampler):
  rng = np.random.default_rng(2)
  rows = [list(rng.integers(0, 280, 7)), list(rng.integers(0, 280, 11))]
  free, _ = sampler.start(rows, max_new_tokens=12, eos_token_ids=[EOS])
  eos = int(free.tokens[0, 3])
  out, _ = sampler.start(rows, max_new_tokens=12, eos_token_ids=[eos], pad_id=7)
  for b in range(2):
    hits = np.flatnonzero(free.tokens[b] == eos)
    n = hits[0] + 1 if hits.size else 12
    assert out.lengths[b] == n
    assert out.stop_reasons[b] == (StopReason.EOS if hits.size else StopReason.LENGTH)
    np.testing.assert_array_equal(out.tokens[b, :n], free.tokens[b, :n])
    np.testing.assert_allclose(out.logprobs[b, :n], free.logprobs[b, :n], atol=1e-6)
    assert (out.tokens[b, n:] == 7).all() and (out.logprobs[b, n:] == 0).all()


def test_stop_token_sequence_and_empty_row(sampler):
  rng = np.random.default_rng(3)
  rows = [list(rng.integers(0, 280, 6)), []]
  free, _ = sampler.start(rows, max_new_tokens=12, eos_token_ids=[EOS])
  seq = tuple(int(t) for t in free.tokens[0, 4:6])
  out, _ = sampler.start(rows, max_new_tokens=12, eos_token_ids=[EOS], stop=[StopTokens(seq)])
  first = next(i for i in range(1, 12) if tuple(free.tokens[0, i - 1:i + 1]) == seq)
  assert out.lengths[0] == first + 1 and out.stop_reasons[0] == StopReason.STOP
  assert out.lengths[1] == 0 and out.stop_reasons[1] == StopReason.NONE


def test_forced_tokens_keep_model_logprobs_and_stop(sampler, model):
  rng = np.random.default_rng(4)
  prompt = list(rng.integers(0, 280, 8))
  forced = [11, 12, 13, 14, 15]
  out, _ = sampler.start([prompt, prompt], max_new_tokens=10, temperature=1.0, rng=jax.random.key(0),
                         force_tokens=[forced, []], stop=[StopTokens((13, 14))], close_token_id=298)
  assert out.tokens[0, :4].tolist() == forced[:4] and out.stop_reasons[0] == StopReason.STOP
  ref = log_softmax(full_logits(model, [prompt + forced[:4]])[0])
  np.testing.assert_allclose(out.logprobs[0, :4], [ref[len(prompt) - 1 + i, t] for i, t in enumerate(forced[:4])],
                             atol=1e-5)
  np.testing.assert_allclose(out.close_logprobs[0], ref[len(prompt) + 3, 298], atol=1e-5)


# ---------------------------------------------------------------------------------------------- filters
def test_filters_and_greedy_on_random_logits():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.standard_normal((6, 50)) * 3, jnp.float32)
  mk = lambda t, p, k, banned=(-1, -1): sampling.SamplingParams(
      jnp.float32(t), jnp.float32(p), jnp.int32(k), jnp.int32(1), jnp.int32(0), jnp.int32(-1),
      jnp.asarray(banned, jnp.int32))
  choose = jax.jit(jax.vmap(lambda key, prm: sampling.choose(logits, prm, key, 8), in_axes=(0, None)))
  keys = jax.random.split(jax.random.key(0), 400)
  x = np.asarray(logits, np.float64)
  order = np.argsort(-x, axis=1)
  for t, p, k in [(1.0, 1.0, 3), (0.7, 0.5, 0), (2.0, 0.8, 5), (1.0, 1e-6, 0)]:
    toks, logp = map(np.asarray, choose(keys, mk(t, p, k)))
    allowed = np.ones_like(x, bool)
    if k:
      allowed &= x >= np.take_along_axis(x, order[:, k - 1:k], 1)
    probs = np.exp(log_softmax(np.where(allowed, x / t, -np.inf)))
    sp = np.take_along_axis(probs, order, 1)
    n_keep = np.maximum(((np.cumsum(sp, 1) - sp) < p).sum(1), 1)
    for b in range(6):
      ok = set(order[b, :n_keep[b]].tolist())
      assert set(toks[:, b].tolist()) <= ok, (t, p, k, b)
    if (t, p, k) == (2.0, 0.8, 5):
      assert max(len(set(toks[:, b])) for b in range(6)) > 1  # it does sample
    np.testing.assert_allclose(logp, np.take_along_axis(log_softmax(x / t)[None].repeat(400, 0),
                                                        toks[..., None], 2)[..., 0], atol=1e-5)
  toks, logp = map(np.asarray, choose(keys[:3], mk(0.0, 0.3, 2)))
  assert (toks == x.argmax(1)).all()
  np.testing.assert_allclose(logp[0], log_softmax(x)[np.arange(6), x.argmax(1)], atol=1e-5)
  # Banned ids are never chosen, not even when they are the argmax; log-probs stay the full distribution's.
  top = order[0, 0]
  for t, k in [(0.0, 0), (1.0, 2), (0.5, 0)]:
    toks, logp = map(np.asarray, choose(keys, mk(t, 1.0, k, banned=(top, -1))))
    assert (toks[:, 0] != top).all()
    if t == 0.0:
      assert (toks[:, 0] == order[0, 1]).all()
    np.testing.assert_allclose(logp[:, 0], log_softmax(x / max(t, 1e-9) if t else x)[0, toks[:, 0]], atol=1e-5)


def test_top_k_sampling_in_the_loop_picks_only_top_k(sampler, model):
  rng = np.random.default_rng(6)
  rows = [list(rng.integers(0, 280, 9)), list(rng.integers(0, 280, 4))]
  out, _ = sampler.start(rows, max_new_tokens=16, temperature=3.0, top_k=3, eos_token_ids=[EOS],
                         rng=jax.random.key(1))
  seqs = [r + out.tokens[b, :out.lengths[b]].tolist() for b, r in enumerate(rows)]
  logits = full_logits(model, seqs)
  for b, r in enumerate(rows):
    for i in range(out.lengths[b]):
      row = logits[b, len(r) - 1 + i]
      assert row[out.tokens[b, i]] >= np.sort(row)[-3] - 1e-5
      np.testing.assert_allclose(out.logprobs[b, i], log_softmax(row / 3.0)[out.tokens[b, i]], atol=1e-5)
  assert len(set(out.tokens[0].tolist())) > 1


def test_first_argmax_equals_argmax_including_ties():
  from mgpo_jax.sampling.logits import first_argmax
  rng = np.random.default_rng(8)
  x = rng.integers(-3, 4, size=(64, 50)).astype(np.float32)  # many ties
  x[3] = -np.inf
  x[4, 7] = np.inf
  np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))


def test_per_row_keys_make_a_rows_samples_independent_of_the_batch(sampler):
  rng = np.random.default_rng(7)
  rows = [list(rng.integers(0, 280, n)) for n in (9, 4, 6)]
  keys = jax.random.split(jax.random.key(3), 3)
  kw = dict(max_new_tokens=16, temperature=1.5, eos_token_ids=[EOS])
  together, _ = sampler.start(rows, rng=keys, **kw)
  alone, _ = sampler.start(rows[1:2], rng=keys[1:2], **kw)
  np.testing.assert_array_equal(together.tokens[1], alone.tokens[0])
  np.testing.assert_allclose(together.logprobs[1], alone.logprobs[0], atol=1e-5)
  # With one key for the batch the rows draw differently (and a key per row is really used).
  shared, _ = sampler.start(rows, rng=keys[1], **kw)
  assert not np.array_equal(shared.tokens, together.tokens)
  with pytest.raises(ValueError, match="one key per row"):
    sampler.start(rows, rng=keys[:2], **kw)


# ---------------------------------------------------------------------------------------------- compiles
@contextlib.contextmanager
def count_compiles():
  events = []
  def listener(event, duration, **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_no_recompilation_after_warmup(model):
  rng = np.random.default_rng(7)
  grid = lambda h, w: np.array([(1, h, w)])
  def call(n_text, g, **kw):
    ids, mask = left_pad([R.image_prompt(g.tolist(), text_before=tuple(rng.integers(10, 280, n_text))),
                          list(rng.integers(10, 280, 3))])
    return sampling.generate(model, ids, mask, R.random_pixels(g.tolist(), rng), g, eos_token_ids=[EOS],
                             sampler_config=CFG, **kw)
  # Prompt = text + <vs> + h*w/4 pads + <ve> + 2 tokens: 18..25 tokens -> bucket 32; <= 64 patches; <= 8 new.
  call(10, grid(4, 4), max_new_tokens=5)  # warm-up
  with count_compiles() as compiles:
    call(12, grid(4, 6), max_new_tokens=7, temperature=0.7, rng=jax.random.key(1))
    call(8, grid(6, 4), max_new_tokens=8, temperature=1.3, top_p=0.9, rng=jax.random.key(2))
    call(5, grid(8, 8), max_new_tokens=3, temperature=1.0, top_k=5, rng=jax.random.key(3))
  assert compiles == [], f"{len(compiles)} recompilation(s) after warm-up"


def test_unrolled_decode_matches_the_layer_scan(model):
  """SamplerConfig.unroll_decode (per-layer weights / KV buffers) samples what the layer scan samples."""
  import dataclasses
  rng = np.random.default_rng(9)
  g = [(1, 4, 4)]
  rows = [R.image_prompt(g, rng=rng), list(rng.integers(10, 280, 5))]
  images = [(R.random_pixels(g, rng), np.array(g)), None]
  outs = []
  for unroll in (True, False):
    s = sampling.Sampler(model, dataclasses.replace(CFG, unroll_decode=unroll))
    assert s.unroll == unroll
    out, conv = s.start(rows, images, max_new_tokens=6, temperature=1.0, rng=jax.random.key(4),
                        eos_token_ids=[EOS])
    outs.append((out, jax.device_get(conv.cache)))
  (a, ca), (b, cb) = outs
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
  assert ca.stacked and cb.stacked
  np.testing.assert_allclose(ca.k_LBKSH, cb.k_LBKSH, atol=1e-5)
  np.testing.assert_array_equal(ca.mask_BS, cb.mask_BS)


# ---------------------------------------------------------------------------------------------- multi-turn
def test_turn2_continues_cache_like_a_full_prefill(sampler, model):
  """Turn 1 (rows of unequal length, one stopping early) then turn 2 (user text + a new image) appended to
  the sampler's cache give the logits / log-probs of one uncached forward over the whole conversation."""
  rng = np.random.default_rng(8)
  g1, g2 = [(1, 4, 8)], [(1, 6, 4)]
  p1 = [R.image_prompt(g1, rng=rng), R.image_prompt(g1, text_before=(5,))]
  im1 = [(R.random_pixels(g1, rng), np.array(g1)) for _ in range(2)]
  out1, conv = sampler.start(p1, im1, max_new_tokens=6, temperature=1.0, rng=jax.random.key(0),
                             eos_token_ids=[EOS], force_tokens=[[-1] * 6, [-1, -1, EOS]], close_token_id=298)
  assert out1.lengths[1] == 3 and out1.stop_reasons[1] == StopReason.EOS
  p2 = [[298] + R.image_prompt(g2, text_before=(11, 12)), [298] + R.image_prompt(g2, text_before=(13,))]
  im2 = [(R.random_pixels(g2, rng), np.array(g2)) for _ in range(2)]
  seq1 = [p + out1.tokens[b, :out1.lengths[b]].tolist() for b, p in enumerate(p1)]

  # Full logits of the turn-2 prefill, straight from the cache the sampler left.
  ids2, mask2 = left_pad(p2)
  vision, grid = qwen2_5_vl.prepare_vision_batch([im[0] for im in im2], [im[1] for im in im2],
                                                 model.cfg.vision, pad_to=64, max_images=1)
  gd, st = nnx.split(model)
  ext = jax.jit(lambda st, c, i, m, v, g: nnx.merge(gd, st).extend(c, i, m, v, g))
  h, _ = ext(st, conv.cache, ids2, mask2, vision, grid)
  inc = np.asarray(model.logits(h))
  both = [([im1[b][0], im2[b][0]], [im1[b][1], im2[b][1]]) for b in range(2)]
  full = full_logits(model, [s + p for s, p in zip(seq1, p2)], both)
  for b in range(2):
    n = len(p2[b])
    np.testing.assert_allclose(inc[b, -n:], full[b, len(seq1[b]):len(seq1[b]) + n], atol=1e-5)
    np.testing.assert_allclose(out1.logprobs[b, :out1.lengths[b]],
                               [log_softmax(full[b, len(p1[b]) - 1 + i])[t]
                                for i, t in enumerate(out1.tokens[b, :out1.lengths[b]])], atol=1e-5)
    np.testing.assert_allclose(out1.close_logprobs[b], log_softmax(full[b, len(seq1[b]) - 1])[298], atol=1e-5)

  # And the sampler's own turn 2 (donating the cache) scores its tokens like the full forward.
  out2, conv = sampler.extend(conv, p2, im2, max_new_tokens=5, temperature=1.0, rng=jax.random.key(1),
                              eos_token_ids=[EOS])
  seq2 = [s + p + out2.tokens[b, :out2.lengths[b]].tolist() for b, (s, p) in enumerate(zip(seq1, p2))]
  full2 = full_logits(model, seq2, both)
  for b in range(2):
    start = len(seq1[b]) + len(p2[b]) - 1
    np.testing.assert_allclose(out2.logprobs[b, :out2.lengths[b]],
                               [log_softmax(full2[b, start + i])[t]
                                for i, t in enumerate(out2.tokens[b, :out2.lengths[b]])], atol=1e-5)
  assert conv.end == int(conv.cache.end)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kw, match", [
    (dict(top_k=9), "top_k"), (dict(temperature=1.0), "rng"), (dict(top_p=0.0), "top_p"),
    (dict(max_new_tokens=17), "max_new_tokens"), (dict(eos_token_ids=[1, 2, 3, 4, 5]), "EOS"),
])
def test_bad_arguments_raise_clear_errors(sampler, kw, match):
  kw = {"max_new_tokens": 4, **kw}
  with pytest.raises(ValueError, match=match):
    sampler.start([[5, 6, 7]], **kw)


def test_image_token_mismatch_raises(sampler):
  rng = np.random.default_rng(9)
  with pytest.raises(ValueError, match="image_pad"):
    sampler.start([R.image_prompt([(1, 4, 4)])], [(R.random_pixels([(1, 4, 8)], rng), np.array([(1, 4, 8)]))],
                  max_new_tokens=4)
