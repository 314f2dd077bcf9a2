"""Memory plan of an MGPO experiment config on a TPU slice (the command line of `mgpo_jax.plan.memory`,
whose docstring says what is planned and how; `--help` prints it).

  python tools/plan.py --config=tpu_v5 --topology=v5p-64
  python tools/plan.py --config=tpu_v5 --topology=v5e-64 --search       # fitting layouts
  python tools/plan.py --config=tpu_v5 --topology=v5p-16 --mesh=1,4,2 --micro_rows_per_device=1 --aot
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from mgpo_jax.plan import memory  # noqa: E402
from mgpo_jax.plan.memory import (HEADROOM, _gib, aot_memory, load_config, markdown, model_config,  # noqa: E402
                                  parse_topology, plan, search, setup_from_config)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=memory.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--config", required=True)
  ap.add_argument("--topology", required=True, help="e.g. v5p-64, v5p-16, v5e-64, v4-32")
  ap.add_argument("--model", default="", help="override the model (qwen2_5_vl_3b/7b/32b/72b)")
  ap.add_argument("--mesh", default="", help="data,fsdp,tensor (default: the config's mesh.shape)")
  ap.add_argument("--micro_rows_per_device", type=int, default=0)
  ap.add_argument("--seq_len", type=int, default=0)
  ap.add_argument("--patches_per_row", type=int, default=0)
  ap.add_argument("--cache_len", type=int, default=0)
  ap.add_argument("--sampling_prompts", type=int, default=0, help="prompts one host decodes together")
  ap.add_argument("--sampling_mesh", default="", help="one host's sampler mesh data,fsdp,tensor")
  ap.add_argument("--remat", choices=("", "true", "false"), default="")
  ap.add_argument("--vision_impl", choices=("chunked", "dense"), default="chunked",
                  help="'chunked' = the code; 'dense' = the earlier [P, P] vision attention, for comparison")
  ap.add_argument("--search", action="store_true", help="list the meshes / batch sizes that fit")
  ap.add_argument("--aot", action="store_true", help="also compile Learner.update for abstract inputs")
  ap.add_argument("--aot_backend", choices=("cpu", "tpu"), default="cpu",
                  help="cpu: simulated CPU mesh; tpu: libtpu's deviceless topology (needs libtpu)")
  ap.add_argument("--aot_python", default="", help="interpreter for the AOT subprocess (one with libtpu)")
  ap.add_argument("--json", default="", help="write the plan as JSON here")
  a = ap.parse_args(argv)
  config = load_config(a.config)
  cfg, source = model_config(config, a.model)
  overrides = {k: v for k, v in dict(
      mesh=tuple(int(x) for x in a.mesh.split(",")) if a.mesh else None,
      micro_rows_per_device=a.micro_rows_per_device or None, seq_len=a.seq_len or None,
      patches_per_row=a.patches_per_row or None, cache_len=a.cache_len or None,
      sampling_prompts=a.sampling_prompts or None,
      sampling_mesh=tuple(int(x) for x in a.sampling_mesh.split(",")) if a.sampling_mesh else None,
      remat=None if not a.remat else a.remat == "true",
      vision_impl=a.vision_impl if a.vision_impl != "chunked" else None).items() if v is not None}
  chip, _ = parse_topology(a.topology)
  result: dict[str, Any] = {"config": a.config, "model_source": source}
  if a.search:
    found = search(config, a.topology, cfg, **{k: v for k, v in overrides.items()
                                              if k not in ("mesh", "micro_rows_per_device")})
    result["search"] = found
    print(f"# {a.topology}: {len(found)} fitting layout(s)\n")
    for p in found:
      print(markdown(p, model_source=source))
    if not found:
      print("nothing fits: no (mesh, rows per device >= 1) keeps the peak under "
            f"{int(HEADROOM * 100)}% of {_gib(chip.hbm_bytes)} GiB\n")
  else:
    s = setup_from_config(config, a.topology, **overrides)
    p = plan(cfg, s, chip)
    aot = (aot_memory(a.config, a.topology, overrides, model=a.model, backend=a.aot_backend,
                      python=a.aot_python) if a.aot else None)
    result.update(plan=p, aot=aot)
    print(markdown(p, aot, source))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=1, default=float)
  return result


if __name__ == "__main__":
  main()
