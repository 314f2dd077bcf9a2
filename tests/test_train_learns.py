"""RL actually learns: a tiny policy is paid for one specific answer token and finds it.

Sampling uses a small jitted helper here (full forward per new token; the prompts are short).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgpo_jax.parallel import sharding as shd
from mgpo_jax.models.qwen2_5_vl import init_model, rope_index
from mgpo_jax.rl import ADVANTAGE_FNS, grpo_advantages
from mgpo_jax.rollout.trajectory import Trajectory, to_train_batch
from mgpo_jax.learner import Learner, LearnerConfig, OptimConfig
from test_train_step import tiny_config

CFG = tiny_config(vocab=32)       # chance of the target token at initialisation ~ 1/32
TARGET = 5
PROMPTS, SAMPLES, PROMPT_LEN, NEW = 8, 8, 6, 2


@functools.partial(jax.jit, static_argnums=(0,))
def _sample(graphdef, params, prompt_RP, rng):
  """NEW tokens per row at temperature 1 and their log-probs [R, NEW]."""
  model = nnx.merge(graphdef, params)
  R = prompt_RP.shape[0]
  ids = jnp.concatenate([prompt_RP, jnp.zeros((R, NEW), prompt_RP.dtype)], axis=1)
  logps = []
  for i in range(NEW):
    mask = jnp.broadcast_to(jnp.arange(ids.shape[1]) < PROMPT_LEN + i, ids.shape)
    positions, _ = rope_index(ids, mask, None, CFG)
    h, _ = model.forward(ids, mask, positions, None)
    logits = model.logits(h[:, PROMPT_LEN + i - 1:PROMPT_LEN + i])[:, 0]
    tok = jax.random.categorical(jax.random.fold_in(rng, i), logits)
    logps.append(jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], -1)[:, 0])
    ids = ids.at[:, PROMPT_LEN + i].set(tok.astype(ids.dtype))
  return ids, jnp.stack(logps, 1)


def _run_rl(advantage_estimator: str, steps: int, stop_at: float | None = None, seed: int = 0):
  """Mean reward per rollout batch (8 prompts x 8 samples, 2 mini-batch updates per batch)."""
  lcfg = LearnerConfig(advantage_estimator=advantage_estimator, micro_batch_size=16, num_mini_batches=2,
                       logprob_chunk_size=8, optim=OptimConfig(learning_rate=3e-3))
  learner = Learner(lcfg, CFG, shd.make_mesh((1, 1, 1), jax.devices()[:1]))
  state = learner.init(init_model(CFG, seed))
  ref = learner.reference_params(state.params)
  rng = np.random.default_rng(seed)
  prompts = rng.integers(0, CFG.bos_token_id, size=(PROMPTS, PROMPT_LEN)).astype(np.int32)
  prompt_RP = np.repeat(prompts, SAMPLES, axis=0)
  R, T = prompt_RP.shape[0], PROMPT_LEN + NEW
  key = jax.random.key(seed)
  rewards_per_step = []
  for step in range(steps):
    ids, logp_RN = _sample(learner.graphdef, state.params, prompt_RP, jax.random.fold_in(key, step))
    ids = np.asarray(ids)
    rewards = (ids[:, PROMPT_LEN] == TARGET).astype(np.float32)
    rewards_per_step.append(float(rewards.mean()))
    if stop_at is not None and rewards_per_step[-1] >= stop_at:
      break
    turn_mask = np.zeros(T, np.int32)
    turn_mask[PROMPT_LEN:] = 1
    trajs = []
    for r in range(R):
      logp = np.zeros(T, np.float32)
      logp[PROMPT_LEN:] = np.asarray(logp_RN[r])
      trajs.append(Trajectory(token_ids=ids[r].astype(np.int32), turn_mask=turn_mask, logprobs=logp,
                              turn_spans=[(PROMPT_LEN, T)], images=[], pixel_values=[], image_grids=[],
                              texts=[""], reward=float(rewards[r])))
    # The rows of a prompt share it as one prefix (the learner encodes it once).
    batch = to_train_batch(trajs, np.arange(R) // SAMPLES, seq_bucket=NEW + 1, patch_bucket=0, max_images=1,
                           pad_id=0, vision_cfg=CFG.vision, max_turns=1, prefix_bucket=PROMPT_LEN - 1)
    state, metrics = learner.train_on_rollout(state, ref, batch)
  return rewards_per_step, {k: float(v) for k, v in metrics[-1].items()}


def test_reward_rises_from_chance_to_90_percent():
  rewards, metrics = _run_rl("grpo", steps=40, stop_at=0.9)
  assert rewards[0] < 0.2, rewards                 # chance level at initialisation
  assert rewards[-1] >= 0.9, f"reward per step: {np.round(rewards, 3).tolist()}"
  assert np.isfinite(list(metrics.values())).all()


def test_flipped_advantage_does_not_learn(monkeypatch):
  """Negative control: the same loop, advantages negated, drives the reward down instead."""
  monkeypatch.setitem(ADVANTAGE_FNS, "negated_grpo", lambda r, g, n, eps: -grpo_advantages(r, g, n, eps))
  rewards, _ = _run_rl("negated_grpo", steps=10)
  assert max(rewards) < 0.3 and np.mean(rewards[-4:]) <= 0.05, np.round(rewards, 3).tolist()
