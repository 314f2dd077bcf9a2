"""MGPO-shaped two-turn rollout with shared prompts (SamplerConfig.share_prompts) on vs off.

Shape (defaults): `prompts` x `generations` rows; turn 1 = a prompt of ~`prompt_text` text tokens + one
`image_px` square image (448 px -> 1024 patches -> 256 image tokens), identical for the rows of a prompt,
then `turn1_tokens` sampled tokens; turn 2 = a few text tokens + a per-row crop of `crop_px` (a different
crop per row) and `turn2_tokens` sampled tokens. No EOS (every row decodes the full length), temperature 1,
a key per row. Bench-size random weights (`common.hf_dir_for`), float32. The variants run in the same
process, alternating after one warm-up each; medians. Sanity: both of ours give the same tokens.

With `--transformers` (default on), a third variant: transformers `generate` on the same weights, the
way a PyTorch user without vLLM runs a two-turn rollout: one batched call per turn (temperature 1, no
top-k/top-p, no EOS), the turn-2 call on the whole conversation so far (both images, no KV reuse
across calls, no prefix sharing). Its tokens differ (another RNG); the work is the same shape.

  python -m bench.shared_rollout                  # bench size, 2 prompts x 8 rows
  python -m bench.shared_rollout --size=smoke --repeats=1 --out_dir=/tmp/sr
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bench import common


class TransformersRollout:
  """Two turns with transformers `generate`: one batched call per turn, the second re-encoding the whole
  conversation (the turn-1 KV cache is not carried across `generate` calls)."""

  def __init__(self, hf_dir: str, image_token_id: int, pad_id: int, vision_ids: tuple[int, ...]):
    import os

    import torch
    from transformers import GenerationConfig
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    self.torch, self.image_token_id, self.vision_ids = torch, image_token_id, vision_ids
    self.model = common.load_torch_model(hf_dir)
    self.gen = lambda n: GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0,
                                          top_k=None, top_p=None, use_cache=True, eos_token_id=None,
                                          pad_token_id=pad_id)

  def _generate(self, ids_BT: np.ndarray, pixels, grids, n: int) -> np.ndarray:
    torch = self.torch
    ids = torch.as_tensor(ids_BT)
    with torch.inference_mode():
      out = self.model.generate(
          input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.as_tensor(np.concatenate(pixels)),
          image_grid_thw=torch.as_tensor(np.concatenate(grids)), mm_token_type_ids=(ids == self.image_token_id).int(),
          generation_config=self.gen(n))
    return out.numpy()

  def __call__(self, rows1, images1, rows2, images2, turn1_tokens: int, turn2_tokens: int):
    import time
    t0 = time.perf_counter()
    conv1 = self._generate(np.asarray(rows1, np.int64), [p for p, _ in images1], [g for _, g in images1], turn1_tokens)
    t1 = time.perf_counter()
    # A random model samples vision special tokens too; in the next call transformers would read them as
    # image placeholders without pixels. A trained model does not emit them: make them plain text.
    conv1 = conv1.copy()
    answer = conv1[:, len(rows1[0]):]
    answer[np.isin(answer, self.vision_ids)] = 10  # an ordinary text id (the rows' text ids are >= 10)
    ids2 = np.concatenate([conv1, np.asarray(rows2, np.int64)], 1)
    pixels = [p for a, b in zip(images1, images2) for p in (a[0], b[0])]  # row after row, in token order
    grids = [g for a, b in zip(images1, images2) for g in (a[1], b[1])]
    self._generate(ids2, pixels, grids, turn2_tokens)
    return t1 - t0, time.perf_counter() - t1


def run(size: str, prompts: int, generations: int, prompt_text: int, image_px: int, crop_px: int,
        turn1_tokens: int, turn2_tokens: int, repeats: int, out_dir: str | None,
        transformers: bool = True) -> dict:
  import jax

  from mgpo_jax import sampling
  from mgpo_jax.models.qwen2_5_vl import params as params_lib

  cfg = common.get_size(size)
  hf_dir = common.hf_dir_for(size)
  model = params_lib.from_pretrained(hf_dir)
  rng = np.random.default_rng(0)

  def image(px):
    g = np.array([[1, px // cfg.vision.patch_size, px // cfg.vision.patch_size]])
    n = int(np.prod(g))
    return rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32), g, n // cfg.vision.merge_unit

  def text(n):
    return list(rng.integers(10, cfg.vocab_size - 20, n))

  block = lambda n_tok: [cfg.vision_start_token_id] + [cfg.image_token_id] * n_tok + [cfg.vision_end_token_id]
  firsts = []
  for _ in range(prompts):
    pv, g, n_tok = image(image_px)
    firsts.append((text(prompt_text // 2) + block(n_tok) + text(prompt_text - prompt_text // 2), (pv, g)))
  B = prompts * generations
  rows1 = [firsts[b // generations][0] for b in range(B)]
  images1 = [firsts[b // generations][1] for b in range(B)]
  crops = [image(crop_px) for _ in range(B)]
  rows2 = [text(4) + block(c[2]) + text(6) for c in crops]
  images2 = [(c[0], c[1]) for c in crops]
  T1 = max(map(len, rows1))
  T2 = max(map(len, rows2))
  pow2 = lambda n: 1 << (n - 1).bit_length()
  scfg = sampling.SamplerConfig(
      prompt_buckets=tuple(sorted({pow2(T1), pow2(T2)})), new_token_buckets=(pow2(max(turn1_tokens, turn2_tokens)),),
      patch_buckets=tuple(sorted({pow2(len(images1[0][0])), pow2(len(images2[0][0]))})),
      cache_buckets=(pow2(T1 + T2 + turn1_tokens + turn2_tokens + 2 * pow2(max(turn1_tokens, turn2_tokens)) + 2),))
  samplers = {"shared": sampling.Sampler(model, dataclasses.replace(scfg, share_prompts=True)),
              "per row": sampling.Sampler(model, dataclasses.replace(scfg, share_prompts=False))}
  keys1 = jax.random.split(jax.random.key(1), B)
  keys2 = jax.random.split(jax.random.key(2), B)
  kw = dict(temperature=1.0, eos_token_ids=[])
  last = {}

  def rollout(name):
    s = samplers[name]
    out1, conv = s.start(rows1, images1, max_new_tokens=turn1_tokens, rng=keys1, reserve=T2 + turn2_tokens + 1, **kw)
    out2, conv = s.extend(conv, rows2, images2, max_new_tokens=turn2_tokens, rng=keys2, **kw)
    last[name] = (out1, out2)
    return out1.device_s, out2.device_s

  warm = {name: common.timed(lambda n=name: rollout(n))[0] for name in samplers}
  turn_s = {name: [] for name in samplers}
  fns = {name: (lambda n=name: turn_s[n].append(rollout(n))) for name in samplers}
  if transformers:  # rows of equal length by construction: no padding on either side
    theirs = TransformersRollout(hf_dir, cfg.image_token_id, cfg.pad_token_id or 0,
                                 (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                                  cfg.vision_end_token_id))
    call = lambda: theirs(rows1, images1, rows2, images2, turn1_tokens, turn2_tokens)
    warm["transformers"] = common.timed(call)[0]
    turn_s["transformers"] = []
    fns["transformers"] = lambda: turn_s["transformers"].append(call())
  times = common.alternate(fns, repeats)
  same = all(np.array_equal(a.tokens, b.tokens) for a, b in zip(last["shared"], last["per row"]))
  base = common.median(times["per row"])
  theirs_s = common.median(times["transformers"]) if transformers else float("nan")
  rows = [{"variant": k, "rollout s (median)": common.median(v), "speed-up vs per row": base / common.median(v),
           "speed-up vs transformers": theirs_s / common.median(v),
           "turn 1 s": common.median([t[0] for t in turn_s[k]]),
           "turn 2 s": common.median([t[1] for t in turn_s[k]]), "compile/warm-up s": warm[k]}
          for k, v in times.items()]
  meta = {"machine": common.machine_info(), "size": size, "rows": f"{prompts} prompts x {generations}",
          "turn1_prompt_tokens": T1, "prompt_image_patches": len(images1[0][0]), "turn1_new_tokens": turn1_tokens,
          "turn2_chunk_tokens": T2, "crop_patches": len(images2[0][0]), "turn2_new_tokens": turn2_tokens,
          "repeats": repeats, "same_tokens": same}
  print(common.markdown_table(rows))
  print(meta)
  if not same:
    raise AssertionError("shared and per-row prefill sampled different tokens")
  notes = ["turn 1 / turn 2 s: ours, the sampler's device seconds per turn; transformers, wall seconds per "
           "`generate` call (its turn 2 re-encodes the whole conversation, images included)."]
  if out_dir is not None:
    common.write_results("shared_rollout", "Two-turn rollout: shared prompt prefill vs per row vs transformers",
                         [("Rollout time", rows)], meta, notes, out_dir=out_dir)
  return {"rows": rows, "meta": meta}


def main(argv=None):
  common.mgpo_workload_main(__doc__, run, argv, with_transformers=True)


if __name__ == "__main__":
  main()
