"""One sharding table: logical parameter axes -> mesh axes ('data', 'fsdp', 'tensor').

Every parameter of the model carries `axes=(...)` metadata naming its logical axes (e.g.
`('layers', 'embed', 'heads', 'head_dim')`). `RULES` maps each logical name to a mesh axis (or None =
replicated). A dimension that the mesh axis does not divide is replicated instead (logged once), so the
same table serves a tiny CPU test model and 7B on a pod.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Training layout: FSDP over the model dimension, tensor parallel over heads / mlp / vocab.
RULES: Mapping[str, str | None] = {
    "layers": None,
    "embed": FSDP,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "head_dim": None,
    "mlp": TENSOR,
    "vocab": TENSOR,
    "qkv": None,
    "patch": None,
    "norm": None,
}

# Sampling layout: no FSDP (FSDP would all-gather every weight at every decoded token); weights are
# tensor-parallel and replicated over the data/fsdp axes.
SAMPLING_RULES: Mapping[str, str | None] = {**RULES, "embed": None}

# Activations: batch over both data-parallel axes.
BATCH = (DATA, FSDP)

_warned: set[tuple] = set()


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """`shape` with its -1 (if any) replaced so that the product is `num_devices` (ValueError if impossible)."""
  shape = tuple(int(s) for s in shape)
  known = math.prod(s for s in shape if s != -1)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one -1")
  if -1 in shape:
    if known < 1 or num_devices % known:
      raise ValueError(f"mesh shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all); one entry may be -1 (= the rest)."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(resolve_mesh_shape(shape, devices.size)), MESH_AXES)


def local_mesh(shape: Sequence[int] = (1, 1, -1)) -> Mesh:
  """A mesh over this process's devices only (default: tensor-parallel over all of them)."""
  return make_mesh(shape, jax.local_devices())


def per_process_mesh(local: Mesh) -> Mesh:
  """A global mesh with one row of the 'data' axis per process, each laid out like its `local` mesh.

  With one process it is `local` itself. Arrays placed on it with a table that replicates over 'data'
  give every process a complete copy on its own devices (the sampler's weights, see `sampling.policy`).
  """
  if jax.process_count() == 1:
    return local
  per_process = [np.asarray([d for d in jax.devices() if d.process_index == p]).reshape(local.devices.shape)
                 for p in range(jax.process_count())]
  return Mesh(np.concatenate(per_process, axis=0), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, str | None] = RULES) -> P:
  """PartitionSpec for one array; replicates dimensions the mesh axis does not divide."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    mesh_axis = rules.get(name) if name is not None else None
    if name is not None and name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; add it to mgpo_jax.parallel.sharding.RULES")
    if mesh_axis is not None and mesh_axis in used:
      raise ValueError(f"mesh axis {mesh_axis!r} used twice in {tuple(axes)}")
    if mesh_axis is not None and dim % mesh.shape[mesh_axis]:
      key = (tuple(axes), tuple(shape), mesh_axis)
      if key not in _warned:
        _warned.add(key)
        logging.info("replicating dim %s=%d of %s: not divisible by mesh axis %s=%d",
                     name, dim, tuple(axes), mesh_axis, mesh.shape[mesh_axis])
      mesh_axis = None
    if mesh_axis is not None:
      used.add(mesh_axis)
    spec.append(mesh_axis)
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, str | None] = RULES) -> Any:
  """NamedShardings for an (abstract or concrete) nnx.State, from each Variable's `axes` metadata."""
  def one(var):
    axes = getattr(var, "axes", None)
    shape = var.get_value().shape
    if axes is None:
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Shard dimension `batch_axis` over ('data', 'fsdp'), replicate the rest."""
  spec = [None] * ndim
  spec[batch_axis] = BATCH
  return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
