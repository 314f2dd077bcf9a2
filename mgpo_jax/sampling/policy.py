"""The learner -> sampler weight handoff: a `Sampler` on this process's devices that follows a policy.

Rollouts are process-local: each host samples its own prompts with its own copy of the policy,
tensor-parallel over its local devices, so decoding never waits on another host. `PolicySampler.update`
moves the learner's weights (float32, FSDP-sharded over all devices) into that layout: cast to the
compute dtype, resharded over a global mesh with the sampling table (each process's devices then hold a
complete tensor-parallel copy; no device ever holds the full float32 model), and re-wrapped as arrays
of the process-local mesh.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh

from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig
from mgpo_jax.models.qwen2_5_vl.model import Qwen25VL
from mgpo_jax.models.qwen2_5_vl.params import abstract_model
from mgpo_jax.parallel import sharding as shd
from mgpo_jax.sampling.sampler import Sampler, SamplerConfig


class PolicySampler:
  """A `Sampler` over `mesh` (this process's devices) fed a policy's parameters after every update.

      policy = PolicySampler(model_cfg, params, param_shardings, jnp.bfloat16, SamplerConfig(...),
                             tokenizer, mesh=sharding.local_mesh(), rules=sharding.SAMPLING_RULES)
      policy.sampler.start(...)          # roll out with the current weights
      policy.update(new_params)          # after the learner's update

  Args:
    model_cfg: the policy's sizes.
    params: its parameters (`nnx.Param` state), laid out by `param_shardings` (e.g. the learner's).
    param_shardings: their shardings (a pytree like `params`).
    dtype: the dtype the sampler computes in (the learner's compute dtype).
    sampler_cfg: the sampler's static shapes.
    tokenizer: the tokenizer (stop tokens, detokenisation).
    mesh: the process-local sampling mesh.
    rules: the sampler's sharding table.
  """

  def __init__(self, model_cfg: Qwen25VLConfig, params: nnx.State, param_shardings: Any, dtype,
               sampler_cfg: SamplerConfig, tokenizer, *, mesh: Mesh, rules: Mapping[str, str | None]):
    self.local_mesh = mesh
    self.global_mesh = shd.per_process_mesh(mesh)
    self.graphdef, abs_params = nnx.split(abstract_model(model_cfg, dtype))
    self.global_shardings = shd.state_shardings(abs_params, self.global_mesh, rules)
    self.local_shardings = shd.state_shardings(abs_params, self.local_mesh, rules)
    self._cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p),
                         in_shardings=(param_shardings,), out_shardings=param_shardings)
    self.sampler = Sampler(self._to_model(params), sampler_cfg, tokenizer)

  def _to_model(self, params: nnx.State) -> Qwen25VL:
    cast = self._cast(params)
    placed = jax.device_put(cast, self.global_shardings)
    del cast
    if jax.process_count() > 1:
      leaves, treedef = jax.tree.flatten(placed)
      shardings = jax.tree.leaves(self.local_shardings)
      placed = jax.tree.unflatten(treedef, [
          jax.make_array_from_single_device_arrays(x.shape, s, [shard.data for shard in x.addressable_shards])
          for x, s in zip(leaves, shardings, strict=True)])
    return nnx.merge(self.graphdef, placed)

  def update(self, params: nnx.State) -> None:
    """Takes the policy's new parameters (same layout as at construction)."""
    self.sampler.update(self._to_model(params))
