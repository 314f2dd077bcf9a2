"""Host work between MGPO turns, per sample, and its share of the rollout's wall time.

Part 1 (per sample, one thread): the production code path of `RolloutEngine._after_turn` after a
grounding turn: decode the turn-1 tokens, parse the box, crop the ORIGINAL image, preprocess the crop,
render + tokenize the follow-up user message; timed as a whole and piece by piece. The preprocessing is
compared with transformers' image processors on the same crop and pixel bounds
(`Qwen2VLImageProcessorPil`, the numpy/PIL reference ours is bit-identical to, and `Qwen2VLImageProcessor`,
the torch/torchvision one), outputs checked equal (Pil) / close (torch).

Part 2 (share of wall time): `RolloutEngine.run` end to end on `rollout_samples` samples x
`num_generations` with a random `size` model whose turn 1 is teacher-forced to a valid box (so every row
takes the crop path); the engine's own timings split host work between turns from device work.

Images are `orig_px` originals (MME-RealWorld-like: large photographs) with the pixel bounds of
configs/base.py (`min_pixels` 256*28*28, `max_pixels` 1280*28*28) for part 1; part 2 uses smaller bounds
(`e2e_max_pixels`) so that a CPU can decode them in a few seconds.

  python -m bench.host                                   # -> bench/results/host.{json,md}
  python -m bench.host --size=smoke --repeats=2 --rollout_samples=1 --num_generations=2 --out_dir=/tmp/h
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

from bench import common

TURN1_TEXT = ('The key region for this question is the sign above the door.\n```json\n'
              '[{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "sign"}}]\n```')


@dataclasses.dataclass(frozen=True)
class HostBenchConfig:
  size: str = "bench"
  orig_px: tuple[int, int] = (2048, 1536)     # (W, H) of the original image
  min_pixels: int = 256 * 28 * 28
  max_pixels: int = 1280 * 28 * 28
  repeats: int = 20
  rollout_samples: int = 2
  num_generations: int = 4
  max_new_tokens: int = 80  # the forced turn 1 is ~60 tokens of the local tokenizer
  e2e_max_pixels: int = 64 * 28 * 28
  host_workers: int = 8
  seed: int = 0

  def __post_init__(self):
    if self.repeats < 1 or self.rollout_samples < 1 or self.num_generations < 1:
      raise ValueError("repeats, rollout_samples and num_generations must be >= 1")


def _image(wh, seed):
  from PIL import Image
  rng = np.random.default_rng(seed)
  # Smooth-ish content (as photographs): random low-resolution noise upsampled.
  small = rng.integers(0, 256, (max(wh[1] // 16, 1), max(wh[0] // 16, 1), 3), dtype=np.uint8)
  return Image.fromarray(small).resize(wh, Image.Resampling.BILINEAR)


def _tokenizer_and_model_cfg(size: str, tmp: str):
  from mgpo_jax.models.qwen2_5_vl.chat import special_token_ids
  from mgpo_jax.models.qwen2_5_vl.tokenizer import build_tokenizer
  tok = build_tokenizer(os.path.join(tmp, "tok"))
  sp = special_token_ids(tok)
  cfg = common.get_size(size).replace(
      vocab_size=len(tok), image_token_id=sp.image_pad, video_token_id=sp.video_pad,
      vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end, eos_token_id=sp.im_end,
      bos_token_id=sp.endoftext, pad_token_id=sp.pad)
  return tok, sp, cfg


def _engine(tok, model, image_cfg, cfg: HostBenchConfig, sampler_cls=None, **sampler_kw):
  from mgpo_jax import sampling
  from mgpo_jax.rollout import engine
  scfg = sampling.SamplerConfig(prompt_buckets=(512, 1024, 2048), new_token_buckets=(cfg.max_new_tokens,),
                                patch_buckets=(256, 512, 1024, 2048, 4096, 8192), image_buckets=(1,),
                                cache_buckets=(1024, 2048, 4096, 8192), max_top_k=4)
  sampler = (sampler_cls or sampling.Sampler)(model, scfg, tokenizer=tok, **sampler_kw)
  rcfg = engine.RolloutConfig(num_generations=cfg.num_generations, max_new_tokens=cfg.max_new_tokens,
                              image=image_cfg, host_workers=cfg.host_workers)
  return engine.RolloutEngine(sampler, tok, rcfg)


def _turn1_ids(tok, input_size, eos_id):
  w, h = input_size
  text = TURN1_TEXT.format(x1=w // 4, y1=h // 4, x2=(3 * w) // 4, y2=(3 * h) // 4)
  return np.asarray(tok.encode(text, add_special_tokens=False) + [eos_id], np.int32)


def per_sample_host(tok, sp, model, cfg: HostBenchConfig) -> tuple[list[dict], dict]:
  """Part 1: `_after_turn` and its pieces, per sample; transformers' processors on the same crop."""
  from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig, preprocess_image
  from mgpo_jax.rollout import crop as crop_lib
  from mgpo_jax.rollout import engine as engine_lib
  from mgpo_jax.rollout import parse as parse_lib
  from mgpo_jax.rollout import prompts as prompts_lib
  from mgpo_jax.sampling import SampleOutput, StopReason
  icfg = ImageProcessorConfig(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
  eng = _engine(tok, model, icfg, cfg)
  image = _image(cfg.orig_px, cfg.seed)
  sample = {"question": "What does the sign above the door say?", "choices": ["OPEN", "CLOSED", "EXIT", "PUSH"],
            "answer": "C", "image": image}
  t_first, (pv0, grid0, ids0, messages, input_size) = common.timed(lambda: eng._render_first(0, sample))
  toks = _turn1_ids(tok, input_size, sp.im_end)
  out = SampleOutput(tokens=toks[None], logprobs=np.zeros((1, len(toks)), np.float32),
                     lengths=np.asarray([len(toks)], np.int32), stop_reasons=np.asarray([StopReason.EOS], np.int32),
                     close_logprobs=np.zeros(1, np.float32))

  def after_turn():
    row = engine_lib._Row(sample=sample, sample_index=0, generation_index=0, original=image,
                          input_size=input_size, messages=messages)
    row.add(ids0, 0)
    eng._after_turn(row, out, 0, 0)
    assert row.box_valid[-1], row.box_reasons[-1]
    return row

  row = after_turn()
  crop_img = row.images[-1]
  text = tok.decode(toks[:-1].tolist(), skip_special_tokens=False)
  box = parse_lib.parse_bbox(text, *input_size).box
  message = prompts_lib.followup_user_message(sample["question"], sample["choices"], box, True,
                                              eng.cfg.prompts, is_last_turn=True)
  pieces = {
      "after_turn_total": after_turn,
      "decode": lambda: tok.decode(toks[:-1].tolist(), skip_special_tokens=False),
      "parse_bbox": lambda: parse_lib.parse_bbox(text, *input_size),
      "crop": lambda: crop_lib.crop_original(image, box, input_size),
      "preprocess_crop": lambda: preprocess_image(crop_img, icfg),
      "render_followup": lambda: eng._followup_chunk(row, message, row.grids[-1]),
  }
  # transformers on the same crop and bounds.
  from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil_mod
  import transformers
  kw = dict(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
  hf_pil = pil_mod.Qwen2VLImageProcessorPil(**kw)
  pieces["hf_pil_preprocess_crop"] = lambda: hf_pil(crop_img, return_tensors="np")
  ours_pv, ours_grid = preprocess_image(crop_img, icfg)
  ref = hf_pil(crop_img, return_tensors="np")
  check = {"pil_identical": bool(np.array_equal(ours_pv, ref["pixel_values"])
                                 and np.array_equal(ours_grid[None], ref["image_grid_thw"])),
           "torch_max_abs_diff": float("nan")}
  # The torch backend (`Qwen2VLImageProcessor`) needs torchvision; without it transformers silently
  # falls back to the Pil class, which would be a second copy of the same measurement.
  import importlib.util
  if importlib.util.find_spec("torchvision") is not None:
    hf_torch = transformers.Qwen2VLImageProcessor(**kw)
    pieces["hf_torch_preprocess_crop"] = lambda: hf_torch(crop_img, return_tensors="pt")
    ref_t = hf_torch(crop_img, return_tensors="pt")
    if tuple(ref_t["pixel_values"].shape) == ours_pv.shape:
      check["torch_max_abs_diff"] = float(np.abs(ours_pv - ref_t["pixel_values"].numpy()).max())
  times = common.alternate(pieces, cfg.repeats, pause_s=0.0)
  rows = [{"piece": k, "median_ms": common.median(v) * 1e3, "min_ms": min(v) * 1e3} for k, v in times.items()]
  rows.append({"piece": "turn1_render_first (once, not between turns)", "median_ms": t_first * 1e3,
               "min_ms": t_first * 1e3})
  info = {"orig_px": cfg.orig_px, "input_size": input_size, "crop_px": crop_img.size,
          "crop_patches": int(np.prod(ours_grid)), "turn1_tokens": len(toks), **check}
  return rows, info


def e2e_share(tok, sp, model, cfg: HostBenchConfig) -> dict:
  """Part 2: RolloutEngine.run, host work between turns vs the whole rollout."""
  import jax
  from mgpo_jax import sampling
  from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig, smart_resize
  icfg = ImageProcessorConfig(min_pixels=16 * 28 * 28, max_pixels=cfg.e2e_max_pixels)

  class ForcedSampler(sampling.Sampler):
    def __init__(self, *a, forced_ids=None, **kw):
      super().__init__(*a, **kw)
      self.forced_ids = forced_ids

    def start(self, rows, images=None, **kw):
      force = np.full((len(rows), cfg.max_new_tokens), -1, np.int32)
      n = min(len(self.forced_ids), cfg.max_new_tokens)
      force[:, :n] = self.forced_ids[:n]
      return super().start(rows, images, force_tokens=force, **kw)

  w, h = cfg.orig_px
  hh, ww = smart_resize(h, w, factor=28, min_pixels=icfg.min_pixels, max_pixels=icfg.max_pixels)
  forced = _turn1_ids(tok, (ww, hh), sp.im_end)
  if len(forced) > cfg.max_new_tokens:
    raise ValueError(f"max_new_tokens={cfg.max_new_tokens} < the {len(forced)} tokens of the forced turn 1")
  eng = _engine(tok, model, icfg, cfg, sampler_cls=ForcedSampler, forced_ids=forced)
  samples = [{"question": "What does the sign above the door say?", "choices": ["OPEN", "CLOSED", "EXIT"],
              "answer": "C", "image": _image(cfg.orig_px, cfg.seed + i)} for i in range(cfg.rollout_samples)]
  warm = eng.run(samples, jax.random.key(0))   # compiles both turns' programs
  res = eng.run(samples, jax.random.key(1))
  t = res.timings
  rows_n = cfg.rollout_samples * cfg.num_generations
  between = sum(t.host_s[1:])
  host_all = sum(t.host_s) + t.final_host_s
  return {
      "rows": rows_n, "valid_box_rate": res.metrics.get("valid_box_rate"),
      "total_s": t.total_s, "device_s": sum(t.device_s), "sampler_prep_s": sum(t.prep_s),
      "host_between_turns_s": between, "host_first_prompt_s": t.host_s[0], "host_final_s": t.final_host_s,
      "between_turns_share": between / t.total_s, "all_host_share": host_all / t.total_s,
      "between_turns_ms_per_row": between / rows_n * 1e3,
      "warmup_total_s": warm.timings.total_s,
  }


def run(cfg: HostBenchConfig, out_dir: str | None = None) -> dict:
  from mgpo_jax.models.qwen2_5_vl.params import init_model
  load = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    tok, sp, mcfg = _tokenizer_and_model_cfg(cfg.size, tmp)
    model = init_model(mcfg, seed=cfg.seed)
    pieces, info = per_sample_host(tok, sp, model, cfg)
    share = e2e_share(tok, sp, model, cfg)
  print(common.markdown_table(pieces), common.markdown_table([share]), flush=True)
  med = {r["piece"]: r["median_ms"] for r in pieces}
  compare = [{
      "ours_preprocess_ms": med["preprocess_crop"], "hf_pil_ms": med["hf_pil_preprocess_crop"],
      "hf_torch_ms": med.get("hf_torch_preprocess_crop", "n/a (no torchvision)"),
      "speedup_vs_pil": med["hf_pil_preprocess_crop"] / med["preprocess_crop"],
      "speedup_vs_torch": (med["hf_torch_preprocess_crop"] / med["preprocess_crop"]
                           if "hf_torch_preprocess_crop" in med else "n/a"),
      "pil_identical": info["pil_identical"], "torch_max_abs_diff": info["torch_max_abs_diff"],
  }]
  meta = {"bench": "host", "config": dataclasses.asdict(cfg), "machine": common.machine_info(),
          "loadavg_at_start": load, "image": info}
  notes = [
      f"Part 1: one {cfg.orig_px[0]}x{cfg.orig_px[1]} original, pixel bounds [{cfg.min_pixels}, {cfg.max_pixels}] "
      f"(configs/base.py): model input {info['input_size']}, crop {info['crop_px']} -> {info['crop_patches']} patches; "
      f"medians of {cfg.repeats} alternating repeats, one thread.",
      "after_turn_total is `RolloutEngine._after_turn` (decode + parse + crop + preprocess + render + bookkeeping).",
      f"Part 2: `RolloutEngine.run`, {share['rows']} rows of a random {cfg.size} model, turn 1 teacher-forced to a "
      f"valid box, max_new_tokens {cfg.max_new_tokens}, images <= {cfg.e2e_max_pixels} px, {cfg.host_workers} host "
      "threads; second run (the first compiles). The share depends on the device: a TPU decodes a 7B turn far "
      "faster per row than this CPU decodes the bench model, so compare between_turns_ms_per_row with the "
      "target's per-row decode time too.",
  ]
  common.write_results("host", "Host work between turns", [
      ("Per sample (ms)", pieces), ("Preprocessing vs transformers", compare),
      ("Share of rollout wall time", [share])], meta, notes, out_dir)
  return {"meta": meta, "pieces": pieces, "compare": compare, "share": share}


def parse_args(argv: Sequence[str]) -> tuple[HostBenchConfig, str | None]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  d = HostBenchConfig()
  p.add_argument("--size", default=d.size, choices=sorted(common.SIZES))
  p.add_argument("--orig_px", default=f"{d.orig_px[0]},{d.orig_px[1]}")
  p.add_argument("--repeats", type=int, default=d.repeats)
  p.add_argument("--rollout_samples", type=int, default=d.rollout_samples)
  p.add_argument("--num_generations", type=int, default=d.num_generations)
  p.add_argument("--max_new_tokens", type=int, default=d.max_new_tokens)
  p.add_argument("--e2e_max_pixels", type=int, default=d.e2e_max_pixels)
  p.add_argument("--out_dir", default=None)
  a = p.parse_args(argv)
  w, h = (int(x) for x in a.orig_px.split(","))
  return HostBenchConfig(size=a.size, orig_px=(w, h), repeats=a.repeats, rollout_samples=a.rollout_samples,
                         num_generations=a.num_generations, max_new_tokens=a.max_new_tokens,
                         e2e_max_pixels=a.e2e_max_pixels), a.out_dir


if __name__ == "__main__":
  run(*parse_args(sys.argv[1:]))
