"""A labelled-training step through the three vision layouts: one sequence, packed rows, per input row.

transformers' flattened layout (`pixel_values` [total patches, 1176], `image_grid_thw` [images, 3]) used to
run the vision tower over all the batch's patches as ONE sequence (`prepare_vision_inputs` of every image):
the full-attention blocks then scored every patch against every patch of the batch, (total)^2, masked down
to the image. `model(input_ids, pixel_values=..., image_grid_thw=...)` now regroups the images into rows of
whole images (`prepare_vision_images`), which is what the per-row layout of the sampler and learner
(`prepare_vision_batch`) costs. All three compute the same loss (checked).

Step = value_and_grad of the token NLL over all parameters (no optimizer), jitted per layout, one warm-up
call each, then `repeats` alternating rounds; medians reported.

  python -m bench.flat_vision                     # 32 images x 256 patches, ~1M parameters
  python -m bench.flat_vision --images=4 --repeats=1 --out_dir=/tmp/fv
"""

from __future__ import annotations

import argparse

import numpy as np

from bench import common


def tiny_config():
  """~1M parameters: small enough that attention, not matmuls with weights, dominates."""
  from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
  vocab = 512
  return Qwen25VLConfig(
      vocab_size=vocab, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
      mrope_section=(4, 6, 6), rope_theta=10000.0, max_position_embeddings=4096,
      **common._special_ids(vocab),
      vision=VisionConfig(depth=4, hidden_size=96, intermediate_size=192, num_heads=4, window_size=112,
                          out_hidden_size=128, fullatt_block_indexes=(1, 3)))


def run(images: int, side: int, repeats: int, out_dir: str | None) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mgpo_jax.models.qwen2_5_vl import (Qwen25VL, prepare_vision_batch, prepare_vision_images,
                                          prepare_vision_inputs, rope_index)
  from mgpo_jax.models.qwen2_5_vl.params import num_params

  cfg = tiny_config()
  model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  grid = np.array([[1, side, side]] * images)
  n_patch = side * side
  n_tok = n_patch // cfg.vision.merge_unit
  pv = rng.standard_normal((images * n_patch, cfg.vision.patch_dim)).astype(np.float32)
  row = lambda: ([5, 6, cfg.vision_start_token_id] + [cfg.image_token_id] * n_tok + [cfg.vision_end_token_id]
                 + list(rng.integers(10, 400, 16)))
  ids = np.array([row() for _ in range(images)], np.int32)   # one image per input row
  mask = np.ones_like(ids)
  labels = (ids != cfg.image_token_id).astype(np.float32)

  layouts = {
      "one sequence (before)": (prepare_vision_inputs(pv, grid, cfg.vision), grid),
      "packed rows (flattened, now)": (prepare_vision_images(pv, grid, cfg.vision), grid),
      "per input row": prepare_vision_batch([pv[i * n_patch:(i + 1) * n_patch] for i in range(images)],
                                            [grid[i:i + 1] for i in range(images)], cfg.vision,
                                            pad_to=n_patch, max_images=1),
  }
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def step(params, ids, mask, labels, grid, vision):
    def loss(p):
      m = nnx.merge(graphdef, p)
      pos, _ = rope_index(ids, mask, grid, cfg)
      h, _ = m.forward(ids, mask, pos, vision)
      logp = jax.nn.log_softmax(m.logits(h[:, :-1]), -1)
      nll = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
      return jnp.sum(nll * labels[:, 1:]) / jnp.sum(labels[:, 1:])
    return jax.value_and_grad(loss)(params)

  fns, warm, losses = {}, {}, {}
  for name, (vision, g) in layouts.items():
    args = (params, ids, mask, labels, g, vision)
    t, (l, _) = common.timed(lambda a=args: jax.block_until_ready(step(*a)))
    warm[name], losses[name] = t, float(l)
    fns[name] = lambda a=args: jax.block_until_ready(step(*a))
  ref = losses["per input row"]
  for name, l in losses.items():
    if abs(l - ref) > 1e-4 * max(1.0, abs(ref)):
      raise AssertionError(f"layouts disagree: {losses}")
  times = common.alternate(fns, repeats)
  base = common.median(times["per input row"])
  rows = [{"layout": k, "vision rows x patches": "x".join(map(str, np.shape(layouts[k][0].pixels_PC)[:-1])),
           "step s (median)": common.median(v), "vs per input row": common.median(v) / base,
           "compile+first s": warm[k], "loss": losses[k]} for k, v in times.items()]
  meta = {"machine": common.machine_info(), "images": images, "patches_per_image": n_patch,
          "tokens_per_row": ids.shape[1], "params": num_params(cfg), "repeats": repeats}
  print(common.markdown_table(rows))
  if out_dir is not None:
    common.write_results("flat_vision", "Labelled-training step: flattened vision layout vs per-row",
                         [("Step time", rows)], meta, out_dir=out_dir)
  return {"rows": rows, "meta": meta}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=32)
  ap.add_argument("--side", type=int, default=16, help="patch grid side (16 -> 256 patches per image)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--out_dir", default=common.RESULTS_DIR)
  a = ap.parse_args(argv)
  run(a.images, a.side, a.repeats, a.out_dir)


if __name__ == "__main__":
  main()
