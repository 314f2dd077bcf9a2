"""Shared pieces of the benchmarks: model sizes, the one HF directory both sides load, timing, results.

Both sides of every comparison load the SAME Hugging Face directory: a random transformers
`Qwen2_5_VLForConditionalGeneration` built once per size and saved with `save_pretrained` to
`$MGPO_BENCH_CACHE` (default `~/.cache/mgpo_jax_bench`). Ours loads it with `qwen2_5_vl.from_pretrained`,
theirs with `Qwen2_5_VLForConditionalGeneration.from_pretrained`.

Timing rule: both implementations run in the same process, alternating (ours, theirs, ours, ...),
after a separate warm-up (compile) call that is reported on its own; the median of the repeats is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from mgpo_jax.models.qwen2_5_vl.params import num_params

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")
CACHE_ENV = "MGPO_BENCH_CACHE"

# ------------------------------------------------------------------------------------------------
# Model sizes, by name.
# ------------------------------------------------------------------------------------------------

SIZES: dict[str, Callable[[], Qwen25VLConfig]] = {}


def register_size(name: str):
  def deco(fn: Callable[[], Qwen25VLConfig]):
    SIZES[name] = fn
    return fn
  return deco


def _special_ids(vocab: int) -> dict[str, int]:
  """Qwen's special tokens at the top of a smaller vocabulary (same order as Qwen's)."""
  return dict(bos_token_id=vocab - 10, eos_token_id=vocab - 8, pad_token_id=vocab - 10,
              vision_start_token_id=vocab - 7, vision_end_token_id=vocab - 6, image_token_id=vocab - 5,
              video_token_id=vocab - 4)


@register_size("bench")
def bench_size() -> Qwen25VLConfig:
  """~134M parameters shaped like Qwen2.5-VL-7B: GQA 6:1, M-RoPE, a window-attention vision tower with
  full-attention blocks every 4th layer and a 2x2 patch merger."""
  vocab = 32000
  return Qwen25VLConfig(
      vocab_size=vocab, hidden_size=768, intermediate_size=2048, num_layers=8, num_heads=12, num_kv_heads=2,
      mrope_section=(8, 12, 12), rope_theta=1_000_000.0, max_position_embeddings=32768, **_special_ids(vocab),
      vision=VisionConfig(depth=8, hidden_size=512, intermediate_size=1376, num_heads=8, window_size=112,
                          out_hidden_size=768, fullatt_block_indexes=(3, 7)))


@register_size("smoke")
def smoke_size() -> Qwen25VLConfig:
  """A toy of the same shape (seconds per bench; used by tests/test_bench_smoke.py)."""
  vocab = 512
  return Qwen25VLConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
      mrope_section=(2, 3, 3), rope_theta=10000.0, max_position_embeddings=4096, **_special_ids(vocab),
      vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=112,
                          out_hidden_size=64, fullatt_block_indexes=(1,)))


def get_size(name: str) -> Qwen25VLConfig:
  if name not in SIZES:
    raise ValueError(f"unknown bench size {name!r}; known: {sorted(SIZES)}")
  return SIZES[name]()


# ------------------------------------------------------------------------------------------------
# The shared HF directory.
# ------------------------------------------------------------------------------------------------


def _randomize(model, seed: int) -> None:
  """Every parameter random, fan-in scaled: unit-scale activations and peaked logits, so that greedy
  decoding is not decided by float noise (HF's 0.02 init gives near-uniform logits)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and ("norm" in name or "ln_q" in name):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
      elif p.ndim == 1:
        p.copy_(0.02 * torch.randn(p.shape, generator=g))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) * fan_in ** -0.5)


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mgpo_jax_bench")


def hf_dir_for(size: str, seed: int = 0, root: str | None = None) -> str:
  """The HF directory of `size` (built on first use: random transformers model + `save_pretrained`)."""
  cfg = get_size(size)
  d = cfg.to_hf_dict()
  digest = hashlib.sha1(json.dumps([d, seed], sort_keys=True).encode()).hexdigest()[:10]
  path = os.path.join(root or cache_dir(), f"{size}-{digest}")
  if os.path.isfile(os.path.join(path, "config.json")) and any(
      f.endswith(".safetensors") for f in os.listdir(path)):
    return path
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
    # transformers reads the released (flat) config.json layout that `to_hf_dict` writes.
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(d, f)
    hf_cfg = Qwen2_5_VLConfig.from_pretrained(tmp)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=torch.float32)
    _randomize(model, seed)
    out = os.path.join(tmp, "model")
    model.save_pretrained(out)
    if Qwen25VLConfig.from_pretrained(out) != cfg:
      raise RuntimeError(f"config of the saved {size!r} model does not read back as the bench config")
    os.replace(out, path)  # atomic: a concurrent bench never sees a half-written directory
  return path


def load_torch_model(hf_dir: str, attn: str = "sdpa"):
  """transformers' model from `hf_dir`, float32, eval mode, `attn` attention ('sdpa' or 'eager')."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                             attn_implementation=attn)
  return model.eval()


def param_counts(cfg: Qwen25VLConfig) -> dict[str, int]:
  """Parameters by part; `*_matmul` are the ones multiplied with every token (embedding lookups excluded)."""
  v = cfg.vision
  D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_layer = D * N * H * 2 + D * K * H * 2 + 3 * D * F            # q, o, k, v, gate/up/down
  per_layer_bias = (N + 2 * K) * H + 2 * D
  text_matmul = cfg.num_layers * per_layer
  lm_head = D * cfg.vocab_size
  vd, vf = v.hidden_size, v.intermediate_size
  vis_block = 3 * vd * vd + vd * vd + 3 * vd * vf
  vis_merger = (vd * v.merge_unit) ** 2 + vd * v.merge_unit * v.out_hidden_size
  return dict(
      total=num_params(cfg),
      text_matmul=text_matmul,
      text_bias_norm=cfg.num_layers * per_layer_bias + D,
      lm_head=lm_head,
      embed=cfg.vocab_size * D,
      vision_patch_embed=v.patch_dim * vd,
      vision_blocks_matmul=v.depth * vis_block,
      vision_merger_matmul=vis_merger,
  )


# ------------------------------------------------------------------------------------------------
# Analytic FLOPs (multiply-add = 2 FLOPs).
# ------------------------------------------------------------------------------------------------


def text_forward_flops(cfg: Qwen25VLConfig, batch: int, seq: int, kv_len: int | None = None,
                       with_lm_head: bool = True) -> float:
  """Decoder forward FLOPs for `batch` x `seq` new tokens attending to `kv_len` keys (default: seq,
  dense T x T as our kernel computes it)."""
  c = param_counts(cfg)
  kv_len = seq if kv_len is None else kv_len
  tokens = batch * seq
  matmul = 2 * tokens * (c["text_matmul"] + (c["lm_head"] if with_lm_head else 0))
  attn = 2 * 2 * tokens * kv_len * cfg.num_heads * cfg.head_dim * cfg.num_layers   # QK^T and PV
  return float(matmul + attn)


def vision_forward_flops(cfg: Qwen25VLConfig, patches: int, window_patches: int | None = None) -> float:
  """Vision tower forward FLOPs for `patches` patches. Attention counted as model FLOPs: window blocks
  attend within a window (`window_patches`, default (window/14)^2), full blocks within the image
  (approximated by all `patches`)."""
  v = cfg.vision
  c = param_counts(cfg)
  win = window_patches or (v.window_size // v.patch_size) ** 2
  matmul = 2 * patches * (c["vision_patch_embed"] + c["vision_blocks_matmul"]) \
      + 2 * (patches // v.merge_unit) * c["vision_merger_matmul"]
  n_full = len(v.fullatt_block_indexes)
  attn = 2 * 2 * patches * v.hidden_size * (n_full * patches + (v.depth - n_full) * min(win, patches))
  return float(matmul + attn)


# ------------------------------------------------------------------------------------------------
# Timing.
# ------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
  """Wall seconds of `fn()` (which must block until its results exist) and its result."""
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def alternate(fns: Mapping[str, Callable[[], Any]], repeats: int, pause_s: float = 0.1
              ) -> dict[str, list[float]]:
  """Runs the functions round-robin `repeats` times; seconds per call, per name.

  Alternating spreads slow phases of a shared machine over all contenders instead of one. The pause
  lets the other runtime's spinning worker threads (OpenMP, Eigen) go idle before the next call.
  """
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      time.sleep(pause_s)
      times[name].append(timed(fn)[0])
  return times


def median(xs: Sequence[float]) -> float:
  return float(statistics.median(xs))


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """Dense f32 matmul FLOP/s of this machine through JAX (all cores), median and best of `repeats`."""
  import jax
  import jax.numpy as jnp
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  ts = [timed(lambda: f(a, b).block_until_ready())[0] for _ in range(repeats)]
  flops = 2.0 * n ** 3
  return {"n": n, "median_flops": flops / median(ts), "best_flops": flops / min(ts)}


def torch_matmul_peak_flops(n: int = 2048, repeats: int = 5) -> dict[str, float]:
  """The same measurement through torch (for reference: the baseline's own ceiling)."""
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  a @ b
  ts = [timed(lambda: a @ b)[0] for _ in range(repeats)]
  flops = 2.0 * n ** 3
  return {"n": n, "median_flops": flops / median(ts), "best_flops": flops / min(ts)}


# ------------------------------------------------------------------------------------------------
# Machine description and results.
# ------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
  import jax
  info: dict[str, Any] = {
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "cpu_count": os.cpu_count(),
      "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
  }
  try:
    import torch
    import transformers
    info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                transformers=transformers.__version__)
  except ImportError:
    pass
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache")
    info["lscpu"] = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in out.splitlines() if ":" in l)
                     if k.strip() in keep}
  except (OSError, subprocess.SubprocessError):
    pass
  return info


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    if v == 0 or (1e-3 <= abs(v) < 1e6):
      return f"{v:.4g}" if abs(v) < 100 else f"{v:,.1f}"
    return f"{v:.3e}"
  if isinstance(v, bool):
    return "yes" if v else "no"
  return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  if not rows:
    return "(no rows)\n"
  columns = list(columns or rows[0].keys())
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
  return "\n".join(lines) + "\n"


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return _jsonable(dataclasses.asdict(x))
  return x


def write_results(name: str, title: str, sections: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
                  meta: Mapping[str, Any], notes: Sequence[str] = (), out_dir: str | None = None
                  ) -> tuple[str, str]:
  """Writes `<out_dir>/<name>.json` (everything) and `<name>.md` (tables + notes); returns both paths."""
  out_dir = out_dir or RESULTS_DIR
  os.makedirs(out_dir, exist_ok=True)
  json_path, md_path = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
  with open(json_path, "w") as f:
    json.dump(_jsonable({"meta": meta, "sections": {k: list(v) for k, v in sections}, "notes": list(notes)}),
              f, indent=1)
  parts = [f"# {title}\n"]
  for heading, rows in sections:
    parts.append(f"## {heading}\n\n{markdown_table(rows)}")
  if notes:
    parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
  m = dict(meta)
  parts.append("## Run\n\n```json\n" + json.dumps(_jsonable(m), indent=1) + "\n```\n")
  with open(md_path, "w") as f:
    f.write("\n".join(parts))
  return json_path, md_path


def mgpo_workload_main(doc: str, run, argv=None, with_transformers: bool = False):
  """The command line of the MGPO-shaped shared-vs-per-row benches (`shared_rollout`, `shared_update`):
  parses the workload's shape and calls `run(size, prompts, generations, prompt_text, image_px, crop_px,
  turn1_tokens, turn2_tokens, repeats, out_dir)` (plus `transformers=` where `with_transformers`)."""
  ap = argparse.ArgumentParser(description=doc.splitlines()[0])
  ap.add_argument("--size", default="bench")
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--generations", type=int, default=8)
  ap.add_argument("--prompt_text", type=int, default=40)
  ap.add_argument("--image_px", type=int, default=448)
  ap.add_argument("--crop_px", type=int, default=336)
  ap.add_argument("--turn1_tokens", type=int, default=30)
  ap.add_argument("--turn2_tokens", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out_dir", default=RESULTS_DIR)
  if with_transformers:
    ap.add_argument("--transformers", action=argparse.BooleanOptionalAction, default=True,
                    help="also time transformers generate on the same workload (one call per turn)")
  a = ap.parse_args(argv)
  kw = {"transformers": a.transformers} if with_transformers else {}
  return run(a.size, a.prompts, a.generations, a.prompt_text, a.image_px, a.crop_px, a.turn1_tokens,
             a.turn2_tokens, a.repeats, a.out_dir, **kw)
