"""Tests of mgpo_jax.rl.logprobs against float64 NumPy and naive-JAX references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgpo_jax.rl import logprobs


def _ref(hidden, w, targets, temperature=1.0):
  z = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  logsm = z - np.log(np.exp(z).sum(-1, keepdims=True))
  logp = np.take_along_axis(logsm, np.asarray(targets)[..., None], -1)[..., 0]
  return logp, -(np.exp(logsm) * logsm).sum(-1)


def _naive_jax(hidden, w, targets):
  logsm = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", hidden, w,
                                        preferred_element_type=jnp.float32), axis=-1)
  logp = jnp.take_along_axis(logsm, targets[..., None], -1)[..., 0]
  return logp, -jnp.sum(jnp.exp(logsm) * logsm, -1)


def _inputs(seed, batch=2, length=13, dim=16, vocab=37, scale=1.0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(batch, length, dim)).astype(dtype)
  w = (scale * rng.normal(size=(dim, vocab)) / np.sqrt(dim)).astype(dtype)
  targets = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
  return hidden, w, targets


# (T, chunk): not divisible, divisible, chunk > T, chunk of 1.
CASES = [(13, 4), (12, 4), (13, 64), (5, 1)]


@pytest.mark.parametrize("length,chunk", CASES)
def test_matches_float64_reference(length, chunk):
  # scale=4 gives peaked distributions (large logit range) as well as flat ones.
  hidden, w, targets = _inputs(0, length=length, scale=4.0)
  logp, ent = logprobs.token_logprobs_and_entropy(hidden, w, targets, chunk_size=chunk)
  want_logp, want_ent = _ref(hidden, w, targets)
  assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
  assert logp.shape == ent.shape == targets.shape
  np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(ent), want_ent, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length,chunk", CASES[:2])
def test_gradients_equal_naive(length, chunk):
  hidden, w, targets = _inputs(1, length=length, vocab=29)
  rng = np.random.default_rng(1)
  c_logp, c_ent = (rng.normal(size=targets.shape).astype(np.float32) for _ in range(2))

  def objective(fn):
    def f(h, w_):
      logp, ent = fn(h, w_, targets)
      return jnp.sum(c_logp * logp) + jnp.sum(c_ent * ent)
    return jax.jit(jax.grad(f, argnums=(0, 1)))

  chunked = lambda h, w_, t: logprobs.token_logprobs_and_entropy(h, w_, t, chunk_size=chunk)
  got = objective(chunked)(hidden, w)
  want = objective(_naive_jax)(hidden, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)


def test_gradient_without_entropy_and_with_temperature():
  hidden, w, targets = _inputs(2)
  temp = 0.7
  f = lambda h, w_: jnp.sum(logprobs.token_logprobs_and_entropy(
      h, w_, targets, chunk_size=4, compute_entropy=False, temperature=temp)[0])
  naive = lambda h, w_: jnp.sum(_naive_jax(h / temp, w_, targets)[0])
  got, want = jax.jit(jax.grad(f, (0, 1)))(hidden, w), jax.jit(jax.grad(naive, (0, 1)))(hidden, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)
  logp, ent = logprobs.token_logprobs_and_entropy(hidden, w, targets, chunk_size=4,
                                                  compute_entropy=False, temperature=temp)
  assert ent is None
  np.testing.assert_allclose(np.asarray(logp), _ref(hidden, w, targets, temp)[0], atol=1e-5)


def test_bf16_inputs():
  hidden, w, targets = _inputs(3, dim=32)
  h16, w16 = jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  logp, ent = logprobs.token_logprobs_and_entropy(h16, w16, targets, chunk_size=5)
  assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32
  # Reference on the bf16-rounded inputs: the matmul accumulates in f32, so it stays tight.
  want_logp, want_ent = _ref(np.asarray(h16, np.float32), np.asarray(w16, np.float32), targets)
  np.testing.assert_allclose(np.asarray(logp), want_logp, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ent), want_ent, atol=1e-4)
  grads = jax.jit(jax.grad(lambda h, w_: jnp.sum(sum(logprobs.token_logprobs_and_entropy(
      h, w_, targets, chunk_size=5))), (0, 1)))(h16, w16)
  want = jax.jit(jax.grad(lambda h, w_: jnp.sum(sum(_naive_jax(h, w_, targets))), (0, 1)))(
      jnp.asarray(h16, jnp.float32), jnp.asarray(w16, jnp.float32))
  for g, r in zip(grads, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=0.05, rtol=0.05)


def _temp_bytes(fn, *args):
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_never_materialises_full_f32_logits():
  batch, length, dim, vocab, chunk = 2, 256, 8, 4096, 16
  hidden, w, targets = _inputs(4, batch=batch, length=length, dim=dim, vocab=vocab)
  full_logits_bytes = batch * length * vocab * 4

  def loss(fn):
    return lambda h, w_: jnp.sum(sum(fn(h, w_, targets)))

  chunked = lambda h, w_, t: logprobs.token_logprobs_and_entropy(h, w_, t, chunk_size=chunk)
  # The measurement can fail: the naive version does need the full logits.
  assert _temp_bytes(jax.grad(loss(_naive_jax), (0, 1)), hidden, w) >= full_logits_bytes
  assert _temp_bytes(loss(chunked), hidden, w) < full_logits_bytes / 4
  assert _temp_bytes(jax.grad(loss(chunked), (0, 1)), hidden, w) < full_logits_bytes / 4


def test_shift_targets():
  ids = np.array([[5, 6, 7, 8], [1, 2, 3, 4]], np.int32)
  targets, valid = logprobs.shift_targets(ids)
  np.testing.assert_array_equal(targets[:, :-1], ids[:, 1:])
  np.testing.assert_array_equal(valid, [[True, True, True, False]] * 2)
  assert targets.shape == ids.shape and valid.dtype == jnp.bool_


@pytest.mark.parametrize(
    "shapes,kwargs,match",
    [
        (((2, 3), (4, 5), (2, 3)), {}, "hidden_BTD"),
        (((2, 3, 4), (5, 6), (2, 3)), {}, "lm_head_DV"),
        (((2, 3, 4), (4, 6), (2, 4)), {}, "targets_BT"),
        (((2, 3, 4), (4, 6), (2, 3)), {"chunk_size": 0}, "chunk_size"),
        (((2, 3, 4), (4, 6), (2, 3)), {"temperature": 0.0}, "temperature"),
    ],
)
def test_bad_inputs_raise_value_error(shapes, kwargs, match):
  h, w, t = (np.zeros(s, np.float32) for s in shapes)
  with pytest.raises(ValueError, match=match):
    logprobs.token_logprobs_and_entropy(h, w, t.astype(np.int32), **kwargs)


def test_float_targets_rejected():
  h, w, t = _inputs(5)
  with pytest.raises(ValueError, match="integer"):
    logprobs.token_logprobs_and_entropy(h, w, t.astype(np.float32))
