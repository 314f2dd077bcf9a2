"""Rollout throughput: our jitted sampler vs transformers `generate`, same weights, same prompts.

Both load the same HF directory (`common.hf_dir_for`). Each row's prompt is text + one image
(`image_px` square, preprocessed once; both sides get the same `pixel_values`), `prompt_len` tokens,
no padding. Greedy, exactly `new_tokens` new tokens (no EOS), KV cache on in both (ours: fixed-size
cache in one jitted prefill + `while_loop` program; theirs: `DynamicCache`), float32, transformers with
`attn_implementation` (default sdpa).

Per batch size: one warm-up call each (ours compiles; reported separately), then `repeats` rounds of
[ours(N), theirs(N), ours(1), theirs(1)] alternating. End-to-end tokens/s = B*N / t(N); decode tokens/s =
B*(N-1) / (t(N) - t(1)) (t(1) = prefill incl. the vision tower + one token). Our max_new_tokens is a
traced value, so N and 1 run the same compiled program. Sanity: greedy tokens agree (first
`check_tokens` of every row must match in float32; the fraction over all N is reported).

  python -m bench.rollout                       # bench size, batches 1 8 32 -> bench/results/rollout.*
  python -m bench.rollout --size=smoke --batch_sizes=1,2 --repeats=1 --out_dir=/tmp/r
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

import numpy as np

from bench import common


@dataclasses.dataclass(frozen=True)
class RolloutBenchConfig:
  size: str = "bench"
  batch_sizes: tuple[int, ...] = (1, 8, 32)
  new_tokens: int = 64
  prompt_len: int = 128
  image_px: int = 224
  repeats: int = 3
  attn: str = "sdpa"
  check_tokens: int = 8
  seed: int = 0
  profile_dir: str = ""   # jax.profiler trace of one of our calls per batch size
  cache_root: str = ""    # where the HF directory is built ("" = common.cache_dir())

  def __post_init__(self):
    if self.attn not in ("sdpa", "eager"):
      raise ValueError(f"attn must be 'sdpa' or 'eager', got {self.attn!r}")
    if self.new_tokens < 2 or self.repeats < 1 or not self.batch_sizes:
      raise ValueError("new_tokens >= 2, repeats >= 1 and at least one batch size are required")


def make_prompts(cfg, batch: int, prompt_len: int, image_px: int, seed: int):
  """`batch` rows of `prompt_len` tokens: text, <vision_start> <image_pad>*n <vision_end>, text.

  Returns (ids [B, T] int64, pixel_values [B * P, 1176] f32, grid [B, 3] int64); the image of every row
  is a different random picture of the same size (so no padding anywhere).
  """
  from PIL import Image
  from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig, preprocess_image
  rng = np.random.default_rng(seed)
  icfg = ImageProcessorConfig(min_pixels=image_px * image_px, max_pixels=image_px * image_px)
  ids, pvs, grids = [], [], []
  for _ in range(batch):
    img = Image.fromarray(rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8))
    pv, grid = preprocess_image(img, icfg)
    n_img = int(np.prod(grid)) // cfg.vision.merge_unit
    n_text = prompt_len - n_img - 2
    if n_text < 2:
      raise ValueError(f"prompt_len={prompt_len} leaves no text around an image of {n_img} tokens")
    text = rng.integers(10, cfg.vocab_size - 20, size=n_text)
    before = n_text // 4
    ids.append(np.concatenate([text[:before], [cfg.vision_start_token_id], np.full(n_img, cfg.image_token_id),
                               [cfg.vision_end_token_id], text[before:]]))
    pvs.append(pv)
    grids.append(grid)
  return np.stack(ids).astype(np.int64), np.concatenate(pvs), np.stack(grids).astype(np.int64)


class Ours:
  """Our side: a `Sampler` over the model loaded with `qwen2_5_vl.from_pretrained`."""

  def __init__(self, hf_dir: str, new_tokens: int):
    from mgpo_jax import sampling
    from mgpo_jax.models import qwen2_5_vl
    self.model = qwen2_5_vl.from_pretrained(hf_dir)
    # One output-buffer bucket: max_new_tokens 1 and N run the same program (a traced length).
    self.sampler = sampling.Sampler(self.model, sampling.SamplerConfig(new_token_buckets=(new_tokens,)))

  def __call__(self, ids, pixel_values, grid, max_new_tokens: int) -> np.ndarray:
    per_row = pixel_values.shape[0] // ids.shape[0]
    images = [(pixel_values[b * per_row:(b + 1) * per_row], grid[b:b + 1]) for b in range(ids.shape[0])]
    out, _ = self.sampler.start(list(ids), images, max_new_tokens=max_new_tokens, temperature=0.0,
                                eos_token_ids=[])
    return out.tokens


class Theirs:
  """transformers' `generate` (PyTorch, CPU threads = all cores)."""

  def __init__(self, hf_dir: str, attn: str, image_token_id: int, pad_id: int):
    import torch
    from transformers import GenerationConfig
    torch.set_num_threads(os.cpu_count() or 1)
    self.torch = torch
    self.model = common.load_torch_model(hf_dir, attn)
    self.image_token_id = image_token_id
    self.gen = lambda n: GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                          eos_token_id=None, pad_token_id=pad_id)

  def __call__(self, ids, pixel_values, grid, max_new_tokens: int) -> np.ndarray:
    torch = self.torch
    ids_t = torch.as_tensor(ids)
    with torch.inference_mode():
      out = self.model.generate(
          input_ids=ids_t, attention_mask=torch.ones_like(ids_t), pixel_values=torch.as_tensor(pixel_values),
          image_grid_thw=torch.as_tensor(grid), mm_token_type_ids=(ids_t == self.image_token_id).int(),
          generation_config=self.gen(max_new_tokens))
    return out[:, ids.shape[1]:].numpy()


def run(cfg: RolloutBenchConfig, out_dir: str | None = None) -> dict:
  """Runs the benchmark; writes `rollout.{json,md}` to `out_dir` and returns the result dict."""
  import jax
  mcfg = common.get_size(cfg.size)
  hf_dir = common.hf_dir_for(cfg.size, root=cfg.cache_root or None)
  load = os.getloadavg()
  ours = Ours(hf_dir, cfg.new_tokens)
  theirs = Theirs(hf_dir, cfg.attn, mcfg.image_token_id, mcfg.pad_token_id or 0)
  rows, N = [], cfg.new_tokens
  for B in cfg.batch_sizes:
    ids, pv, grid = make_prompts(mcfg, B, cfg.prompt_len, cfg.image_px, cfg.seed + B)
    warm_ours, tok_ours = common.timed(lambda: ours(ids, pv, grid, N))
    warm_theirs, tok_theirs = common.timed(lambda: theirs(ids, pv, grid, N))
    if cfg.profile_dir:
      with jax.profiler.trace(os.path.join(cfg.profile_dir, f"rollout_b{B}")):
        ours(ids, pv, grid, N)
    k = min(cfg.check_tokens, N)
    first_match = bool((tok_ours[:, :k] == tok_theirs[:, :k]).all())
    t = common.alternate({
        "ours_N": lambda: ours(ids, pv, grid, N), "theirs_N": lambda: theirs(ids, pv, grid, N),
        "ours_1": lambda: ours(ids, pv, grid, 1), "theirs_1": lambda: theirs(ids, pv, grid, 1),
    }, cfg.repeats)
    m = {k: common.median(v) for k, v in t.items()}
    dec = lambda side: B * (N - 1) / max(m[f"{side}_N"] - m[f"{side}_1"], 1e-9)
    row = {
        "batch": B,
        "ours_tok_s": B * N / m["ours_N"], "theirs_tok_s": B * N / m["theirs_N"],
        "speedup": m["theirs_N"] / m["ours_N"],
        "ours_decode_tok_s": dec("ours"), "theirs_decode_tok_s": dec("theirs"),
        "decode_speedup": dec("ours") / dec("theirs"),
        "ours_prefill_s": m["ours_1"], "theirs_prefill_s": m["theirs_1"],
        "ours_warmup_s": warm_ours, "theirs_warmup_s": warm_theirs,
        "first_tokens_match": first_match,
        "token_match_frac": float((tok_ours == tok_theirs).mean()),
    }
    row["raw_s"] = t
    rows.append(row)
    print(common.markdown_table([{k: v for k, v in row.items() if k != "raw_s"}]), flush=True)
  meta = {"bench": "rollout", "config": dataclasses.asdict(cfg), "hf_dir": hf_dir,
          "params": common.param_counts(mcfg), "machine": common.machine_info(), "loadavg_at_start": load,
          "image_tokens_per_row": int(np.prod(grid[0])) // mcfg.vision.merge_unit}
  table = [{k: v for k, v in r.items() if k != "raw_s"} for r in rows]
  notes = [
      f"{cfg.size} model ({meta['params']['total'] / 1e6:.0f}M params), float32, greedy, {N} new tokens, "
      f"prompt {cfg.prompt_len} tokens incl. {meta['image_tokens_per_row']} image tokens "
      f"({cfg.image_px}x{cfg.image_px} image); transformers attn_implementation={cfg.attn}, KV cache on in both.",
      "tok_s = B*N / t(N) (prefill + vision + decode); decode_tok_s = B*(N-1) / (t(N) - t(1)); "
      f"medians of {cfg.repeats} alternating repeats; warm-up (our compile) excluded and listed separately.",
      "first_tokens_match: the first check_tokens greedy tokens of every row are identical on both sides.",
  ]
  common.write_results("rollout", "Rollout: jitted sampler vs transformers generate",
                       [("Throughput", table)], meta, notes, out_dir)
  return {"meta": meta, "rows": rows}


def parse_args(argv: Sequence[str]) -> tuple[RolloutBenchConfig, str | None]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  d = RolloutBenchConfig()
  p.add_argument("--size", default=d.size, choices=sorted(common.SIZES))
  p.add_argument("--batch_sizes", default=",".join(map(str, d.batch_sizes)))
  p.add_argument("--new_tokens", type=int, default=d.new_tokens)
  p.add_argument("--prompt_len", type=int, default=d.prompt_len)
  p.add_argument("--image_px", type=int, default=d.image_px)
  p.add_argument("--repeats", type=int, default=d.repeats)
  p.add_argument("--attn", default=d.attn, choices=("sdpa", "eager"))
  p.add_argument("--profile_dir", default="")
  p.add_argument("--cache_root", default="")
  p.add_argument("--out_dir", default=None)
  a = p.parse_args(argv)
  cfg = RolloutBenchConfig(size=a.size, batch_sizes=tuple(int(x) for x in a.batch_sizes.split(",")),
                           new_tokens=a.new_tokens, prompt_len=a.prompt_len, image_px=a.image_px,
                           repeats=a.repeats, attn=a.attn, profile_dir=a.profile_dir, cache_root=a.cache_root)
  return cfg, a.out_dir


if __name__ == "__main__":
  run(*parse_args(sys.argv[1:]))
