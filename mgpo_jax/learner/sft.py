"""Supervised fine-tuning (SFT): the token negative log-likelihood under a loss mask, and its update.

Rows are `TrainBatch`es like the RL learner's (`rollout.trajectory.to_train_batch`), so the loss mask is
the turn mask: whatever the caller marked trainable. Single-device and unsharded: the laptop-scale
warm-up (`mgpo_jax.repro`) is what it serves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mgpo_jax.learner.step import sequence_logprobs, token_loss_mask
from mgpo_jax.models.qwen2_5_vl.model import Qwen25VL
from mgpo_jax.rl.batch import TrainBatch


def sft_loss(model: Qwen25VL, batch: TrainBatch, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """Mean negative log-likelihood of the masked tokens, and their count."""
  logp_BT, _ = sequence_logprobs(model, batch, chunk_size=chunk_size, temperature=1.0, compute_entropy=False)
  mask_BT = token_loss_mask(batch)
  count = jnp.sum(mask_BT)
  return -jnp.sum(logp_BT * mask_BT) / jnp.maximum(count, 1.0), count


class SFTTrainer:
  """AdamW on the token NLL; one jitted, donated update per batch (shapes fixed by the caller's buckets).

      trainer = SFTTrainer(model, optax.adamw(...))
      metrics = trainer.step(batch)        # host TrainBatch (to_train_batch); or dispatch()
      model = trainer.model()
  """

  def __init__(self, model: Qwen25VL, tx: optax.GradientTransformation, chunk_size: int = 1024):
    self.graphdef, params = nnx.split(model, nnx.Param)
    self.tx = tx
    self.state = (params, tx.init(params))
    self._update = jax.jit(functools.partial(self._update_fn, chunk_size=chunk_size), donate_argnums=(0,))

  def _update_fn(self, state, batch: TrainBatch, *, chunk_size: int):
    params, opt_state = state

    def loss_fn(p):
      return sft_loss(nnx.merge(self.graphdef, p), batch, chunk_size)

    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, opt_state), {"loss": loss, "tokens": count, "grad_norm": optax.tree.norm(grads)}

  def dispatch(self, batch: TrainBatch) -> dict[str, jax.Array]:
    """Starts the update of `batch`; returns its metrics as device scalars (fetch them later)."""
    self.state, metrics = self._update(self.state, batch)
    return metrics

  def step(self, batch: TrainBatch) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(self.dispatch(batch)).items()}

  def params(self) -> nnx.State:
    return self.state[0]

  def model(self) -> Qwen25VL:
    return nnx.merge(self.graphdef, self.state[0])
