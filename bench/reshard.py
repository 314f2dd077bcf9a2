"""Training (FSDP, `sharding.RULES`) vs sampling (tensor-parallel, `sharding.SAMPLING_RULES`) weight layouts
on a simulated 8-device CPU mesh: the cost of resharding the policy for the sampler, and what it saves
per decoded token.

Runs itself in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is
fixed when JAX starts). Mesh ('data', 'fsdp', 'tensor') = `mesh` (default (1, 4, 2)). The model is the
`size` config, random weights placed with RULES (as the learner holds them), float32.

  reshard   `jax.device_put(params, sampling_shardings)` and a jitted identity with
            `out_shardings=sampling_shardings`; medians of `repeats` after a warm-up
  decode    the jitted sampler (greedy, `batch` rows, `new_tokens` tokens) with the weights in each layout;
            per decoded token = (t(N) - t(1)) / (B * (N - 1))
  bytes     per device: weights under each table, bytes received by the reshard (all-gather over 'fsdp'),
            and the all-gather bytes per decode step the FSDP layout implies (`tools/plan.py`)

On CPU "devices" are threads sharing one memory, so collectives are memcpys: the measured times say how
the programs behave, the bytes say what an ICI would carry.

  python -m bench.reshard                              # bench size -> bench/results/reshard.{json,md}
  python -m bench.reshard --size=smoke --repeats=1 --new_tokens=4 --out_dir=/tmp/s
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence

import numpy as np

from bench import common

DEVICES = 8


@dataclasses.dataclass(frozen=True)
class ReshardBenchConfig:
  size: str = "bench"
  mesh: tuple[int, int, int] = (1, 4, 2)
  batch: int = 8
  new_tokens: int = 32
  prompt_len: int = 128
  image_px: int = 224
  repeats: int = 3
  seed: int = 0

  def __post_init__(self):
    if int(np.prod(self.mesh)) != DEVICES:
      raise ValueError(f"mesh {self.mesh} must use the {DEVICES} simulated devices")
    if self.new_tokens < 2 or self.repeats < 1:
      raise ValueError("new_tokens >= 2 and repeats >= 1 are required")


def _worker(cfg: ReshardBenchConfig) -> dict:
  """Runs inside the 8-device process."""
  import jax
  from flax import nnx
  from mgpo_jax import sampling
  from mgpo_jax.parallel import sharding as shd
  from mgpo_jax.models.qwen2_5_vl.params import init_model
  from bench.rollout import make_prompts
  from mgpo_jax.plan import memory as plan_lib
  if jax.device_count() < DEVICES:
    raise RuntimeError(f"needs {DEVICES} devices, have {jax.device_count()} (run through `run`)")
  mcfg = common.get_size(cfg.size)
  mesh = shd.make_mesh(cfg.mesh, jax.devices()[:DEVICES])
  model = init_model(mcfg, seed=cfg.seed, mesh=mesh, rules=shd.RULES)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  train_sh = shd.state_shardings(params, mesh, shd.RULES)
  samp_sh = shd.state_shardings(params, mesh, shd.SAMPLING_RULES)
  block = lambda t: jax.block_until_ready(t)
  put = lambda: block(jax.device_put(params, samp_sh))
  ident = jax.jit(lambda p: p, in_shardings=(train_sh,), out_shardings=samp_sh)
  jitted = lambda: block(ident(params))
  warm_put, _ = common.timed(put)
  warm_jit, _ = common.timed(jitted)
  t = common.alternate({"device_put": put, "jit_identity": jitted}, cfg.repeats, pause_s=0.0)
  samp_params = put()
  # The same values in both layouts (a reshard moves bytes, never changes them).
  same = all(np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(samp_params)))

  ids, pv, grid = make_prompts(mcfg, cfg.batch, cfg.prompt_len, cfg.image_px, cfg.seed)
  per_row = pv.shape[0] // cfg.batch
  images = [(pv[b * per_row:(b + 1) * per_row], grid[b:b + 1]) for b in range(cfg.batch)]
  scfg = sampling.SamplerConfig(new_token_buckets=(cfg.new_tokens,))
  samplers = {name: sampling.Sampler(nnx.merge(graphdef, p, rest), scfg)
              for name, p in (("fsdp", params), ("tensor_parallel", samp_params))}

  def gen(name, n):
    return lambda: samplers[name].start(list(ids), images, max_new_tokens=n, temperature=0.0, eos_token_ids=[])[0]

  warm = {name: common.timed(gen(name, cfg.new_tokens)) for name in samplers}
  match = bool(np.array_equal(warm["fsdp"][1].tokens, warm["tensor_parallel"][1].tokens))
  td = common.alternate({f"{name}_{n}": gen(name, n) for name in samplers for n in (cfg.new_tokens, 1)},
                        cfg.repeats, pause_s=0.0)
  m = {k: common.median(v) for k, v in td.items()}
  B, N = cfg.batch, cfg.new_tokens
  per_tok = {name: (m[f"{name}_{N}"] - m[f"{name}_1"]) / (B * (N - 1)) for name in samplers}

  leaves = plan_lib.param_leaves(mcfg)
  itemsize = np.dtype(jax.tree.leaves(params)[0].dtype).itemsize
  b_train = plan_lib.param_bytes(leaves, cfg.mesh, shd.RULES, itemsize)["per_device_bytes"]
  b_samp = plan_lib.param_bytes(leaves, cfg.mesh, shd.SAMPLING_RULES, itemsize)["per_device_bytes"]
  fsdp = cfg.mesh[1]
  gather_step = plan_lib.param_bytes(leaves, cfg.mesh, shd.RULES, itemsize)["per_device_bytes"] * (fsdp - 1)
  reshard_in = b_samp * (1 - 1 / fsdp)
  reshard_s = common.median(t["jit_identity"])
  saving = per_tok["fsdp"] - per_tok["tensor_parallel"]
  return {
      "reshard": [{"method": k, "median_s": common.median(v), "min_s": min(v),
                   "warmup_s": warm_put if k == "device_put" else warm_jit} for k, v in t.items()],
      "decode": [{"weights": name, "s_per_token": per_tok[name], "tok_s": 1 / per_tok[name],
                  "t_N_s": m[f"{name}_{N}"], "t_1_s": m[f"{name}_1"], "warmup_s": warm[name][0]}
                 for name in samplers],
      "bytes": [{
          "weights_per_device_fsdp": b_train, "weights_per_device_tensor_parallel": b_samp,
          "reshard_bytes_in_per_device": reshard_in, "fsdp_allgather_bytes_per_decode_step": gather_step,
          "fsdp_allgather_bytes_per_decoded_token": gather_step / (B // (cfg.mesh[0] * cfg.mesh[1])),
      }],
      "summary": [{
          "reshard_s": reshard_s, "decode_saving_s_per_token": saving,
          "tokens_to_amortise": reshard_s / saving if saving > 0 else float("inf"),
          "values_identical": same, "greedy_tokens_identical": match,
      }],
      "raw_s": {"reshard": t, "decode": td},
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
  }


def run(cfg: ReshardBenchConfig, out_dir: str | None = None) -> dict:
  """Runs `_worker` in an 8-device subprocess; writes `reshard.{json,md}`."""
  load = os.getloadavg()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={DEVICES}"))
  code = ("import json, sys; from bench import reshard as r; "
          "out = r._worker(r.ReshardBenchConfig(**json.loads(sys.argv[1]))); print('RESHARD_JSON=' + json.dumps(out))")
  args = json.dumps(dataclasses.asdict(cfg))
  proc = subprocess.run([sys.executable, "-c", code, args], env=env, cwd=common.REPO_ROOT, capture_output=True,
                        text=True, timeout=1800)
  line = next((l for l in proc.stdout.splitlines() if l.startswith("RESHARD_JSON=")), None)
  if line is None:
    raise RuntimeError(f"reshard worker failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
  res = json.loads(line[len("RESHARD_JSON="):])
  mcfg = common.get_size(cfg.size)
  meta = {"bench": "reshard", "config": dataclasses.asdict(cfg), "params": common.param_counts(mcfg),
          "machine": {**common.machine_info(), "simulated_devices": res["devices"]}, "loadavg_at_start": load,
          "raw_s": res["raw_s"]}
  print(common.markdown_table(res["reshard"]), common.markdown_table(res["decode"]),
        common.markdown_table(res["summary"]), flush=True)
  notes = [
      f"{cfg.size} model ({meta['params']['total'] / 1e6:.0f}M params, float32) on mesh (data, fsdp, tensor) = "
      f"{cfg.mesh} of {DEVICES} simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES}).",
      "reshard: RULES (embed over fsdp) -> SAMPLING_RULES (embed replicated): an all-gather over 'fsdp'.",
      f"decode: greedy, batch {cfg.batch}, {cfg.new_tokens} new tokens; s_per_token = (t(N) - t(1)) / (B (N - 1)).",
      "Simulated devices share one memory and 2 cores: collectives are memcpys, so the times show the "
      "program structure, not ICI; the bytes columns are what a TPU slice would move.",
  ]
  common.write_results("reshard", "Training vs sampling sharding (8 simulated devices)", [
      ("Reshard RULES -> SAMPLING_RULES", res["reshard"]), ("Decode with each weight layout", res["decode"]),
      ("Bytes per device", res["bytes"]), ("Summary", res["summary"])], meta, notes, out_dir)
  return {"meta": meta, **res}


def parse_args(argv: Sequence[str]) -> tuple[ReshardBenchConfig, str | None]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  d = ReshardBenchConfig()
  p.add_argument("--size", default=d.size, choices=sorted(common.SIZES))
  p.add_argument("--mesh", default=",".join(map(str, d.mesh)))
  p.add_argument("--batch", type=int, default=d.batch)
  p.add_argument("--new_tokens", type=int, default=d.new_tokens)
  p.add_argument("--repeats", type=int, default=d.repeats)
  p.add_argument("--out_dir", default=None)
  a = p.parse_args(argv)
  return ReshardBenchConfig(size=a.size, mesh=tuple(int(x) for x in a.mesh.split(",")), batch=a.batch,
                            new_tokens=a.new_tokens, repeats=a.repeats), a.out_dir


if __name__ == "__main__":
  run(*parse_args(sys.argv[1:]))
