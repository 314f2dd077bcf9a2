"""The GRPO/MGPO learner: one jitted SPMD program per mini-batch update.

Per rollout batch of R rows (prompts x n samples; rows of a prompt share a group id):

  host    TrainBatch [R, ...] --split_rollout--> num_mini_batches x TrainBatch [K, U, ...]
          (K micro-batches of U rows; rows stay in rollout order, mini-batch m = rows [m*K*U, (m+1)*K*U));
          prefix leaves [K, Gm, ...]: each device's rows get the prompts they continue (`rl.batch`)
  device  old_logp="recompute": log-probs of every mini-batch under the policy BEFORE the first
          update (verl's `compute_log_prob`), one forward-only program per mini-batch
  device  for m in range(num_mini_batches): ONE program (compiled once, m is traced)
            advantages of all R rows from rewards_R + group_ids_R, then the rows of mini-batch m
            loss normaliser from the turn mask of the whole mini-batch (exact accumulation)
            lax.scan over the K micro-batches (each prompt encoded once per device, `forward_shared`):
              reference log-probs (frozen params, no grad)
              policy log-probs + entropy, PPO-clip + KL + entropy loss, grads (f32 accumulation)
            global-norm clip + AdamW on the float32 master params
            -> new TrainState (donated in, aliased out) and device-scalar metrics

Layout: params/optimizer state sharded by `mgpo_jax.parallel.sharding.RULES` (FSDP over `embed`, tensor
parallel over heads/mlp/vocab); batch rows (axis 1 of [K, U, ...]) and prefixes (axis 1 of [K, Gm, ...])
over ('data', 'fsdp'), a device's rows pointing only at its own prefixes.
`micro_batch_size` counts rows over ALL devices, so the maths do not depend on the mesh.

Precision (`Precision.BF16`): the state keeps float32 master params and float32 Adam moments; the
step casts the master params to bfloat16 for the forward/backward (the cast's transpose returns f32
grads, accumulated in f32) and applies the update in float32. A master copy, not "updates computed
in f32 then added to bf16 params": at the paper's lr 1e-6 an Adam step changes a weight of magnitude
~1e-2 by ~1e-6, far below bf16's half-ulp (~4e-5 there), so bf16 params would round most updates
away. The frozen reference params are kept in bf16 (forward only).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mgpo_jax.parallel import processes, sharding as shd
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.models.qwen2_5_vl.model import Qwen25VL, prefix_rows, rope_index
from mgpo_jax.models.qwen2_5_vl.params import abstract_model
from mgpo_jax.rl.advantages import get_advantage_fn
from mgpo_jax.rl.batch import PREFIX_FIELDS, ROW_FIELDS, TrainBatch
from mgpo_jax.rl.logprobs import shift_targets, token_logprobs_and_entropy
from mgpo_jax.rl.losses import PolicyLossConfig, compute_loss_normalizer, policy_loss, summarize_metrics
from mgpo_jax.learner.optim import OptimConfig, make_optimizer, make_schedule


class OldLogpSource(enum.Enum):
  """Where the PPO ratio's denominator comes from."""

  # Recompute with the learner's policy before the first update of the rollout batch (verl): the
  # sampler's kernels (cached decode, bf16 KV cache) differ numerically from the learner's forward.
  RECOMPUTE = "recompute"
  SAMPLER = "sampler"  # use `TrainBatch.old_logp_BT` as the rollout produced it


class Precision(enum.Enum):
  """Dtype policy of the learner."""

  FLOAT32 = "float32"  # params, compute and optimizer state in f32 (CPU tests)
  BF16 = "bf16"        # f32 master params + f32 Adam moments, bf16 forward/backward, bf16 reference

  @property
  def compute_dtype(self):
    return jnp.bfloat16 if self is Precision.BF16 else jnp.float32

  @property
  def param_dtype(self):
    return jnp.float32


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """Compile-time settings of the learner (defaults: the MGPO paper, f32 for CPU).

  There is no single-turn switch: the GRPO baseline differs only in the batch the rollout produces
  (one turn in the loss mask, one image); the learner consumes it unchanged.

  Attributes:
    advantage_estimator: name in `mgpo_jax.rl.ADVANTAGE_FNS` ("grpo", "dr_grpo", "rloo", ...).
    advantage_eps: added to the group std.
    loss: `PolicyLossConfig` (clip ratios, KL coefficient and estimator, entropy coefficient,
      aggregation).
    optim: `OptimConfig` (AdamW, clipping, schedule); one optimizer step per mini-batch.
    micro_batch_size: rows per micro-batch over all devices (a multiple of data*fsdp).
    num_mini_batches: optimizer updates per rollout batch (one epoch); paper: 512x8 rows / 128x8.
    num_epochs: passes over each rollout batch (verl's ppo_epochs); every pass's ratios are against the
      rollout policy's log-probs, so passes after the first are off-policy and the clip bounds them.
    logprob_chunk_size: sequence positions per chunk of the vocabulary projection.
    remat: recompute each decoder layer in the backward pass.
    old_logp: `OldLogpSource`.
    precision: `Precision`.
    temperature: the sampling temperature (logits are divided by it, as in verl).
    share_prefix: encode each distinct prompt of a device's rows once (`split_rollout`); False gives every
      row its own copy of its prompt (the per-row computation, same layout and program: for A/B and
      debugging). The numbers agree either way.
  """

  advantage_estimator: str = "grpo"
  advantage_eps: float = 1e-6
  loss: PolicyLossConfig = PolicyLossConfig()
  optim: OptimConfig = OptimConfig()
  micro_batch_size: int = 8
  num_mini_batches: int = 4
  num_epochs: int = 1
  logprob_chunk_size: int = 1024
  remat: bool = True
  old_logp: OldLogpSource = OldLogpSource.RECOMPUTE
  precision: Precision = Precision.FLOAT32
  temperature: float = 1.0
  share_prefix: bool = True

  def __post_init__(self):
    for field, enum_cls in (("old_logp", OldLogpSource), ("precision", Precision)):
      value = getattr(self, field)
      if not isinstance(value, enum_cls):
        try:
          object.__setattr__(self, field, enum_cls(value))
        except ValueError:
          raise ValueError(f"{field}={value!r} is not one of {[e.value for e in enum_cls]}.") from None
    get_advantage_fn(self.advantage_estimator)  # raises ValueError naming the registered ones
    for field in ("micro_batch_size", "num_mini_batches", "num_epochs", "logprob_chunk_size"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be a positive int, got {value!r}.")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be > 0, got {self.temperature}.")
    if not self.advantage_eps >= 0:
      raise ValueError(f"advantage_eps must be >= 0, got {self.advantage_eps}.")
    if not isinstance(self.loss, PolicyLossConfig) or not isinstance(self.optim, OptimConfig):
      raise ValueError("loss must be a PolicyLossConfig and optim an OptimConfig.")


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: optimizer steps taken
  params: nnx.State      # nnx.Param leaves in the param dtype (f32 master copy)
  opt_state: Any         # optax state (f32)


# ------------------------------------------------------------------------------------------------
# Pure pieces (used inside the jitted programs).
# ------------------------------------------------------------------------------------------------


def token_loss_mask(batch: TrainBatch) -> jax.Array:
  """The MGPO turn mask as used by the loss: f32 [..., T].

  `loss_mask_BT`, restricted to real tokens of non-padding rows, and never position 0 (token 0 has
  no log-prob: nothing predicts it).
  """
  loss_mask = jnp.asarray(batch.loss_mask_BT) > 0
  real = jnp.asarray(batch.mask_BT) > 0
  row_ok = (jnp.asarray(batch.group_ids_B) >= 0)[..., None]
  not_first = jnp.arange(loss_mask.shape[-1]) >= 1
  return (loss_mask & real & row_ok & not_first).astype(jnp.float32)


def sequence_logprobs(model: Qwen25VL, batch: TrainBatch, *, chunk_size: int, temperature: float,
                      compute_entropy: bool, num_shards: int = 1) -> tuple[jax.Array, jax.Array | None]:
  """Log-prob (and entropy of the predicting distribution) of every continuation token t, f32 [B, T];
  position 0 (the prompt's last token, whose predicting logits would be the prefix's last) gets 0.

  Each prefix, its images included, is encoded once for all its rows (`Qwen25VL.forward_shared`); the
  continuation's M-RoPE positions start at its prefix's next position, so the values equal those of the
  whole conversation per row. `num_shards`: see `forward_shared` (the learner's data-parallel size).
  """
  cfg = model.cfg
  pgrid = batch.prefix_grid_GI3 if batch.prefix_vision is not None else None
  ppos_3GS, pnext_G = rope_index(batch.prefix_ids_GS, batch.prefix_mask_GS, pgrid, cfg)
  ids_BT, mask_BT = batch.input_ids_BT, batch.mask_BT
  grid = batch.image_grid_BI3 if batch.vision is not None else None
  start_B = prefix_rows(pnext_G, batch.prefix_index_B, num_shards)
  positions_3BT, _ = rope_index(ids_BT, mask_BT, grid, cfg, start_pos_B=start_B)
  h_BTD = model.forward_shared(batch.prefix_ids_GS, batch.prefix_mask_GS, ppos_3GS, batch.prefix_vision,
                               ids_BT, mask_BT, positions_3BT, batch.vision, batch.prefix_index_B,
                               num_shards=num_shards)
  targets_BT, _ = shift_targets(ids_BT)
  logp_BT, ent_BT = token_logprobs_and_entropy(
      h_BTD, model.lm_head_weight(), targets_BT, chunk_size=chunk_size,
      compute_entropy=compute_entropy, temperature=temperature)
  # The logits at t-1 predict token t: move everything right by one so index t is about token t.
  to_tokens = lambda x_BT: jnp.pad(x_BT[:, :-1], ((0, 0), (1, 0)))
  return to_tokens(logp_BT), (to_tokens(ent_BT) if compute_entropy else None)


def rollout_advantages(cfg: LearnerConfig, rewards_R: jax.Array, group_ids_R: jax.Array) -> jax.Array:
  """Advantages of all R rollout rows (group statistics over the whole rollout batch)."""
  fn = get_advantage_fn(cfg.advantage_estimator)
  return fn(rewards_R, group_ids_R, int(rewards_R.shape[0]), cfg.advantage_eps)


def _cast(tree, dtype):
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _masked_row_mean(x_R, valid_R):
  return jnp.sum(jnp.where(valid_R, x_R, 0.0)) / jnp.maximum(jnp.sum(valid_R), 1)


# ------------------------------------------------------------------------------------------------
# The learner.
# ------------------------------------------------------------------------------------------------


class Learner:
  """Builds the sharded train state and the jitted programs for one model config and mesh.

      learner = Learner(LearnerConfig(...), model.cfg, mesh)
      state = learner.init(model)            # takes over the model's arrays (they get donated)
      ref = learner.reference_params(state.params)
      state, metrics = learner.train_on_rollout(state, ref, batch)   # list of device-scalar dicts
      sampler_model = learner.model(state.params)
  """

  def __init__(self, cfg: LearnerConfig, model_cfg: Qwen25VLConfig, mesh: Mesh,
               rules: Mapping[str, str | None] = shd.RULES):
    if not isinstance(cfg, LearnerConfig):
      raise ValueError(f"cfg must be a LearnerConfig, got {type(cfg).__name__}.")
    if tuple(mesh.axis_names) != shd.MESH_AXES:
      raise ValueError(f"mesh axes must be {shd.MESH_AXES}, got {tuple(mesh.axis_names)}.")
    dp = mesh.shape[shd.DATA] * mesh.shape[shd.FSDP]
    if cfg.micro_batch_size % dp:
      raise ValueError(f"micro_batch_size={cfg.micro_batch_size} must be a multiple of the "
                       f"data-parallel size data*fsdp={dp} (rows are sharded over both).")
    self.cfg, self.model_cfg, self.mesh = cfg, model_cfg, mesh
    self.dp = dp
    self.graphdef, abs_params, rest = nnx.split(
        abstract_model(model_cfg, cfg.precision.param_dtype), nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError("the model has non-Param state; the learner only knows how to train nnx.Param.")
    self.tx = make_optimizer(cfg.optim)
    self.schedule = make_schedule(cfg.optim)

    replicated = shd.replicated(mesh)
    self.param_shardings = shd.state_shardings(abs_params, mesh, rules)
    abs_opt = jax.eval_shape(self.tx.init, abs_params)
    is_leaf = lambda x: isinstance(x, (nnx.Variable, NamedSharding))
    opt_shardings = optax.tree_utils.tree_map_params(
        self.tx, lambda _, s: s, abs_opt, self.param_shardings,
        transform_non_params=lambda _: replicated, is_leaf=is_leaf)
    self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                      opt_state=opt_shardings)
    # Every leaf of a split batch is [K, U, ...]: rows (axis 1) over ('data', 'fsdp').
    self.batch_sharding = NamedSharding(mesh, P(None, shd.BATCH))
    self.replicated = replicated

    # Params and optimizer state are donated: the update writes the new state in place (7B: ~84 GB
    # of f32 master + Adam moments that would otherwise exist twice).
    self._update = jax.jit(
        self._update_fn,
        in_shardings=(self.state_shardings, self.param_shardings, self.batch_sharding, replicated,
                      replicated, replicated),
        out_shardings=(self.state_shardings, replicated),
        donate_argnums=(0,))
    self._grads = jax.jit(
        self._grads_fn,
        in_shardings=(self.param_shardings, self.param_shardings, self.batch_sharding, replicated,
                      replicated, replicated),
        out_shardings=(self.param_shardings, replicated))
    self._old_logprobs = jax.jit(
        self._old_logprobs_fn, in_shardings=(self.param_shardings, self.batch_sharding),
        out_shardings=self.batch_sharding)
    self._init_opt = jax.jit(self.tx.init, in_shardings=(self.param_shardings,),
                             out_shardings=opt_shardings)
    self._place_params = jax.jit(lambda p: _cast(p, cfg.precision.param_dtype),
                                 in_shardings=(self.param_shardings,), out_shardings=self.param_shardings)
    # An explicit copy: the reference must never alias the (donated) policy params.
    self._make_ref = jax.jit(
        lambda p: jax.tree.map(lambda x: jnp.array(x.astype(cfg.precision.compute_dtype), copy=True), p),
        in_shardings=(self.param_shardings,), out_shardings=self.param_shardings)

  # ---------------------------------------------------------------- state
  def init(self, model: Qwen25VL) -> TrainState:
    """Train state from a model (`init_model` / `from_pretrained`), placed on the mesh."""
    if model.cfg != self.model_cfg:
      raise ValueError("the model's config differs from the config the learner was built for.")
    _, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
      raise ValueError("the model has non-Param state; the learner only knows how to train nnx.Param.")
    # device_put reshards (e.g. from one device onto the mesh); a no-op when already placed.
    params = self._place_params(jax.device_put(params, self.param_shardings))
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), self.replicated), params=params,
                      opt_state=self._init_opt(params))

  def reference_params(self, params: nnx.State) -> nnx.State:
    """A frozen copy of `params` in the compute dtype (never donated), for the KL term."""
    return self._make_ref(jax.device_put(params, self.param_shardings))

  def model(self, params: nnx.State) -> Qwen25VL:
    """The policy as a model in the compute dtype (e.g. for the sampler)."""
    return nnx.merge(self.graphdef, _cast(params, self.cfg.precision.compute_dtype))

  # ---------------------------------------------------------------- host API
  def split_rollout(self, batch: TrainBatch) -> list[TrainBatch]:
    """This process's rows [R, ...] -> `num_mini_batches` global batches on the mesh: row leaves
    [K, U, ...], prefix leaves [K, Gm, ...].

    With P processes each passes its own R rows (the global batch has P*R). Micro-batch k of
    mini-batch m takes rows [(m*K + k)*u, (m*K + k + 1)*u) of every process (u = U / P), so the global
    row order is (m, k, process, j): the order `global_rows` gives per-row values in.

    Prefixes: a micro-batch's U rows fall into dp = data*fsdp blocks of U/dp rows, one per device. Each
    block gets its own Gl prefix slots (Gm = dp*Gl): with `share_prefix` one per distinct prefix of the
    block's real rows (a group whose rows span two blocks or micro-batches has its prefix in each), without
    it one per row (the per-row computation, in the same layout). Gl is the largest count over all blocks,
    rounded up to a power of two (at most U/dp) to limit recompiles; spare slots repeat the block's first.
    """
    cfg = self.cfg
    R = int(np.shape(batch.rewards_B)[0])
    n_proc = jax.process_count()
    if cfg.micro_batch_size % n_proc:
      raise ValueError(f"micro_batch_size={cfg.micro_batch_size} rows is not divisible by the "
                       f"{n_proc} processes that each feed their part of it.")
    u = cfg.micro_batch_size // n_proc
    rows_per_mini = R // cfg.num_mini_batches
    if R % cfg.num_mini_batches or rows_per_mini % u:
      raise ValueError(
          f"a rollout batch of {R} rows (on each of {n_proc} processes) does not split into "
          f"num_mini_batches={cfg.num_mini_batches} mini-batches of whole micro-batches of "
          f"micro_batch_size={cfg.micro_batch_size} rows.")
    _check_batch(batch, R, num_groups=R * n_proc)
    K, U = rows_per_mini // u, cfg.micro_batch_size
    block = U // self.dp             # rows per device
    if u % block:
      raise ValueError(f"each process's {u} rows of a micro-batch must be whole device blocks of {block} rows")
    blocks_per_proc = u // block
    index_R = np.asarray(batch.prefix_index_B)
    real_R = np.asarray(batch.group_ids_B) >= 0
    slots, tables = np.zeros(R, np.int32), []
    for r0 in range(0, R, block):
      rows = np.arange(r0, r0 + block)
      if cfg.share_prefix:
        table = list(dict.fromkeys(index_R[rows[real_R[rows]]].tolist())) or [int(index_R[r0])]
        slots[rows] = [table.index(int(i)) if ok else 0 for i, ok in zip(index_R[rows], real_R[rows])]
      else:
        table = index_R[rows].tolist()
        slots[rows] = np.arange(block)
      tables.append(table)
    Gl = processes.global_max(max(len(t) for t in tables))[0]
    if cfg.share_prefix:
      Gl = min(1 << (Gl - 1).bit_length(), block)
    take = np.asarray([t + [t[0]] * (Gl - len(t)) for t in tables])          # [R / block, Gl]
    # Global prefix index of each row: (its global device block) * Gl + its slot.
    local_block = (np.arange(R) % u) // block
    global_index = ((jax.process_index() * blocks_per_proc + local_block) * Gl + slots).astype(np.int32)
    batch = batch.replace(prefix_index_B=global_index)
    row_part = {f: getattr(batch, f) for f in ROW_FIELDS}
    prefix_part = {f: getattr(batch, f) for f in PREFIX_FIELDS}
    put = lambda x, local_shape, global_shape: jax.make_array_from_process_local_data(
        self.batch_sharding, np.asarray(x).reshape(local_shape), global_shape)
    minis = []
    for m in range(cfg.num_mini_batches):
      rows = slice(m * rows_per_mini, (m + 1) * rows_per_mini)
      take_m = take[m * rows_per_mini // block:(m + 1) * rows_per_mini // block].reshape(-1)
      rows_m = jax.tree.map(lambda x: put(x[rows], (K, u, *x.shape[1:]), (K, U, *x.shape[1:])), row_part)
      prefix_m = jax.tree.map(
          lambda x: put(np.asarray(x)[take_m], (K, blocks_per_proc * Gl, *x.shape[1:]),
                        (K, self.dp * Gl, *x.shape[1:])), prefix_part)
      minis.append(TrainBatch(**rows_m, **prefix_m))
    return minis

  def global_rows(self, x_R) -> np.ndarray:
    """Per-row values of this process's R rows -> all P*R rows in the global order of `split_rollout`."""
    x_R = np.asarray(x_R)
    n_proc = jax.process_count()
    if n_proc == 1:
      return x_R
    u = self.cfg.micro_batch_size // n_proc
    x_Gu = x_R.reshape(-1, u)  # G = num_mini_batches * K local micro-batch slices, in order
    all_PGu = multihost_utils.process_allgather(x_Gu)
    return np.swapaxes(all_PGu, 0, 1).reshape(-1)

  def old_logprobs(self, params: nnx.State, mini: TrainBatch) -> jax.Array:
    """Log-probs [K, U, T] of a split mini-batch's tokens under `params` (0 off the turn mask)."""
    return self._old_logprobs(params, mini)

  def update(self, state: TrainState, ref_params: nnx.State, mini: TrainBatch, rewards_R: jax.Array,
             group_ids_R: jax.Array, mini_index) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on mini-batch `mini_index` of the rollout (donates `state`)."""
    self._check_mini_index(mini, rewards_R, mini_index)
    return self._update(state, ref_params, mini, rewards_R, group_ids_R, jnp.asarray(mini_index, jnp.int32))

  def grads_and_metrics(self, params: nnx.State, ref_params: nnx.State, mini: TrainBatch, rewards_R,
                        group_ids_R, mini_index) -> tuple[nnx.State, dict[str, jax.Array]]:
    """The gradient of the mini-batch loss (f32, as the update uses it) and the metrics, without
    updating anything (nothing donated; for tests and debugging)."""
    self._check_mini_index(mini, rewards_R, mini_index)
    return self._grads(params, ref_params, mini, rewards_R, group_ids_R, jnp.asarray(mini_index, jnp.int32))

  @staticmethod
  def _check_mini_index(mini: TrainBatch, rewards_R, mini_index) -> None:
    rows = math.prod(np.shape(mini.input_ids_BT)[:2])
    R = np.shape(rewards_R)[0]
    if np.ndim(mini.input_ids_BT) != 3:
      raise ValueError(f"mini-batch input_ids_BT must be [K, U, T] (see split_rollout), got "
                       f"{np.shape(mini.input_ids_BT)}.")
    if isinstance(mini_index, (int, np.integer)) and not 0 <= (int(mini_index) + 1) * rows <= R:
      raise ValueError(f"mini_index={mini_index}: mini-batches of {rows} rows, rollout batch of {R} rows.")

  def train_on_rollout(self, state: TrainState, ref_params: nnx.State, batch: TrainBatch
                       ) -> tuple[TrainState, list[dict[str, jax.Array]]]:
    """All `num_epochs` x `num_mini_batches` updates of one rollout batch. Dispatches asynchronously:
    the returned metrics (one dict per update) are device scalars; pull them after dispatching the next
    work."""
    minis = self.split_rollout(batch)
    if self.cfg.old_logp is OldLogpSource.RECOMPUTE:
      # All before the first update: every mini-batch's ratio is against the rollout policy.
      minis = [m.replace(old_logp_BT=self.old_logprobs(state.params, m)) for m in minis]
    # Advantages need every row's reward and group: gathered from all processes, replicated.
    put = lambda x, dtype: jax.make_array_from_process_local_data(
        self.replicated, self.global_rows(np.asarray(x, dtype)))
    rewards_R = put(batch.rewards_B, np.float32)
    group_ids_R = put(batch.group_ids_B, np.int32)
    metrics = []
    for _ in range(self.cfg.num_epochs):
      for m, mini in enumerate(minis):
        state, met = self.update(state, ref_params, mini, rewards_R, group_ids_R, m)
        metrics.append(met)
    return state, metrics

  # ---------------------------------------------------------------- jitted bodies
  def _policy(self, params_c: nnx.State) -> Qwen25VL:
    """The policy model from params already in the compute dtype."""
    model = nnx.merge(self.graphdef, params_c)
    model.remat = self.cfg.remat
    return model

  def _logprobs(self, model, micro, compute_entropy):
    return sequence_logprobs(model, micro, chunk_size=self.cfg.logprob_chunk_size,
                             temperature=self.cfg.temperature, compute_entropy=compute_entropy,
                             num_shards=self.dp)

  def _old_logprobs_fn(self, params, mini):
    model = self._policy(_cast(params, self.cfg.precision.compute_dtype))
    def body(_, micro):
      logp_UT, _ = self._logprobs(model, micro, compute_entropy=False)
      return None, logp_UT * token_loss_mask(micro)
    return jax.lax.scan(body, None, mini)[1]

  def _grads_fn(self, params, ref_params, mini: TrainBatch, rewards_R, group_ids_R, mini_index):
    """Grad of the mini-batch loss (micro-batch grads summed in the param dtype, f32) and metrics."""
    cfg = self.cfg
    K, U, T = mini.input_ids_BT.shape
    adv_R = rollout_advantages(cfg, rewards_R, group_ids_R)
    adv_KU = jax.lax.dynamic_slice_in_dim(adv_R, mini_index * (K * U), K * U).reshape(K, U)
    adv_KU = jax.lax.with_sharding_constraint(adv_KU, self.batch_sharding)
    mask_KUT = token_loss_mask(mini)
    # One denominator for the whole mini-batch: the micro-batch losses then sum to its loss exactly.
    normalizer = compute_loss_normalizer(mask_KUT.reshape(K * U, T), cfg.loss)
    use_ref = cfg.loss.kl_coef != 0.0

    # Cast once, outside the scan; differentiating w.r.t. the compute-dtype copy gives the same values
    # as differentiating through the cast (whose transpose only converts the cotangent to f32).
    params_c = _cast(params, cfg.precision.compute_dtype)

    def loss_fn(params_c, micro, adv_U, mask_UT, ref_logp_UT):
      logp_UT, ent_UT = self._logprobs(self._policy(params_c), micro, compute_entropy=True)
      return policy_loss(logp_UT, micro.old_logp_BT, ref_logp_UT, ent_UT, adv_U, mask_UT, cfg.loss,
                         loss_normalizer=normalizer)

    def micro_step(grads, xs):
      micro, adv_U, mask_UT = xs
      ref_logp_UT = None
      if use_ref:
        ref_model = nnx.merge(self.graphdef, ref_params)
        ref_logp_UT = jax.lax.stop_gradient(self._logprobs(ref_model, micro, compute_entropy=False)[0])
      (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(
          params_c, micro, adv_U, mask_UT, ref_logp_UT)
      grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
      return jax.lax.with_sharding_constraint(grads, self.param_shardings), (loss, metrics)

    # The f32 accumulator keeps the parameters' (FSDP) sharding across the scan.
    grads0 = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params), self.param_shardings)
    grads, (loss_K, metrics_K) = jax.lax.scan(micro_step, grads0, (mini, adv_KU, mask_KUT))
    metrics = summarize_metrics(jax.tree.map(jnp.sum, metrics_K))
    rows_ok_KU = mini.group_ids_B >= 0
    metrics.update(
        loss=jnp.sum(loss_K),
        grad_norm=optax.tree.norm(grads),
        reward_mean=_masked_row_mean(mini.rewards_B, rows_ok_KU),
        advantage_abs_mean=_masked_row_mean(jnp.abs(adv_KU), rows_ok_KU),
        valid_box_ratio=_masked_row_mean(mini.valid_box_B, rows_ok_KU),
    )
    for k in range(mini.turn_lengths_BK.shape[-1]):
      metrics[f"response_length_turn{k + 1}"] = _masked_row_mean(
          mini.turn_lengths_BK[..., k].astype(jnp.float32), rows_ok_KU)
    return grads, metrics

  def _update_fn(self, state: TrainState, ref_params, mini: TrainBatch, rewards_R, group_ids_R,
                 mini_index):
    grads, metrics = self._grads_fn(state.params, ref_params, mini, rewards_R, group_ids_R, mini_index)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["lr"] = self.schedule(state.step)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def _check_batch(batch: TrainBatch, R: int, num_groups: int | None = None) -> None:
  """Clear errors for inconsistent row counts / sequence lengths (instead of a reshape traceback)."""
  T = np.shape(batch.input_ids_BT)[-1]
  for name in ("input_ids_BT", "mask_BT", "loss_mask_BT", "old_logp_BT"):
    if np.shape(getattr(batch, name)) != (R, T):
      raise ValueError(f"TrainBatch.{name} has shape {np.shape(getattr(batch, name))}, expected {(R, T)}.")
  for name in ("rewards_B", "group_ids_B", "valid_box_B", "prefix_index_B"):
    if np.shape(getattr(batch, name)) != (R,):
      raise ValueError(f"TrainBatch.{name} has shape {np.shape(getattr(batch, name))}, expected ({R},).")
  G, S = np.shape(batch.prefix_ids_GS)
  if np.shape(batch.prefix_mask_GS) != (G, S):
    raise ValueError(f"TrainBatch.prefix_mask_GS has shape {np.shape(batch.prefix_mask_GS)}, expected {(G, S)}.")
  index = np.asarray(batch.prefix_index_B)
  if index.size and (index.min() < 0 or index.max() >= G):
    raise ValueError(f"TrainBatch.prefix_index_B must index the {G} prefixes, got values in "
                     f"[{index.min()}, {index.max()}].")
  if np.ndim(batch.prefix_grid_GI3) != 3 or np.shape(batch.prefix_grid_GI3)[0] != G:
    raise ValueError(f"TrainBatch.prefix_grid_GI3 has shape {np.shape(batch.prefix_grid_GI3)}, "
                     f"expected ({G}, max_images, 3).")
  group_ids = np.asarray(batch.group_ids_B)
  num_groups = R if num_groups is None else num_groups
  if group_ids.size and (group_ids.min() < -1 or group_ids.max() >= num_groups):
    # Group statistics use R segments; an id >= R would silently turn a real row into padding.
    raise ValueError(f"TrainBatch.group_ids_B must be prompt indices within the batch in [0, {num_groups}) "
                     f"or -1 (padding), got values in [{group_ids.min()}, {group_ids.max()}].")
  if np.ndim(batch.turn_lengths_BK) != 2 or np.shape(batch.turn_lengths_BK)[0] != R:
    raise ValueError(f"TrainBatch.turn_lengths_BK has shape {np.shape(batch.turn_lengths_BK)}, "
                     f"expected ({R}, num_turns).")
  if np.ndim(batch.image_grid_BI3) != 3 or np.shape(batch.image_grid_BI3)[0] != R:
    raise ValueError(f"TrainBatch.image_grid_BI3 has shape {np.shape(batch.image_grid_BI3)}, "
                     f"expected ({R}, max_images, 3).")
  for name, vision, n in (("vision", batch.vision, R), ("prefix_vision", batch.prefix_vision, G)):
    for leaf in jax.tree.leaves(vision):
      if np.shape(leaf)[0] != n:
        raise ValueError(f"TrainBatch.{name} leaves must be batched per row [{n}, ...], got a leaf of "
                         f"shape {np.shape(leaf)} (flattened vision layout?).")
