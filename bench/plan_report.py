"""The memory plans bench/README.md quotes: Qwen2.5-VL-7B with configs/tpu_v5.py on v5p-64 as configured,
and the layouts that fit on v5p-16 and v5e-64 (analytic + AOT on a simulated CPU mesh).

  python -m bench.plan_report                # -> bench/results/plan.{md,json}
  python -m bench.plan_report --no_aot       # analytic only (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bench import common
from mgpo_jax.plan import memory as plan_lib

CONFIG = os.path.join(common.REPO_ROOT, "mgpo_jax", "configs", "tpu_v5.py")

# (title, topology, overrides, AOT?) — the layouts tests/test_plan.py checks.
CASES = (
    ("configs/tpu_v5.py as configured (full-resolution images: 2 x 5120 patches per row)", "v5p-64", {}, True),
    ("the same with the earlier dense [P, P] vision attention (for comparison)", "v5p-64",
     {"vision_impl": "dense"}, False),
    ("7B that fits on v5p-16 (full resolution)", "v5p-16", dict(mesh=(1, 4, 2), micro_rows_per_device=1), True),
    ("7B that fits on v5e-64", "v5e-64",
     dict(mesh=(1, 16, 4), micro_rows_per_device=1, seq_len=2048, patches_per_row=512, sampling_prompts=2), True),
)


def run(aot: bool = True, out_dir: str | None = None, backend: str = "cpu", python: str = "") -> dict:
  config = plan_lib.load_config(CONFIG)
  cfg, source = plan_lib.model_config(config)
  out, parts = [], ["# Memory plans: Qwen2.5-VL-7B MGPO (tools/plan.py)\n"]
  for title, topo, over, want_aot in CASES:
    chip, _ = plan_lib.parse_topology(topo)
    s = plan_lib.setup_from_config(config, topo, **over)
    p = plan_lib.plan(cfg, s, chip)
    a = None
    if aot and want_aot:
      try:
        a = plan_lib.aot_memory(CONFIG, topo, dict(over), timeout_s=1200, backend=backend, python=python)
      except (RuntimeError, OSError) as e:  # report, do not hide: the analytic plan still stands
        a = {"error": str(e)[-2000:], "memory_analysis": None, "devices": 0, "backend": backend}
    flags = " ".join(f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in over.items())
    parts.append(f"# {title}\n\n`python tools/plan.py --config=configs/tpu_v5.py --topology={topo} {flags}`\n")
    parts.append(plan_lib.markdown(p, a, source))
    out.append({"title": title, "topology": topo, "overrides": over, "plan": p, "aot": a})
  out_dir = out_dir or common.RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "plan.json"), "w") as f:
    json.dump(out, f, indent=1, default=float)
  with open(os.path.join(out_dir, "plan.md"), "w") as f:
    f.write("\n".join(parts))
  print("\n".join(parts))
  return {"cases": out}


if __name__ == "__main__":
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--no_aot", action="store_true")
  ap.add_argument("--aot_backend", choices=("cpu", "tpu"), default="cpu")
  ap.add_argument("--aot_python", default="", help="an interpreter whose environment has libtpu (for tpu)")
  ap.add_argument("--out_dir", default=None)
  a = ap.parse_args(sys.argv[1:])
  run(aot=not a.no_aot, out_dir=a.out_dir, backend=a.aot_backend, python=a.aot_python)
