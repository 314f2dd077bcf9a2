"""MGPO-shaped learner update with the shared-prefix layout (`LearnerConfig.share_prefix`) on vs off.

Shape (defaults): `prompts` x `generations` rows of a two-turn MGPO conversation: a prompt of ~`prompt_text`
text tokens + one `image_px` square image (448 px -> 1024 patches -> 256 image tokens; ~300 tokens in all),
identical for the rows of a prompt; then per row `turn1_tokens` sampled tokens, a few text tokens + its own
`crop_px` crop (336 px -> 576 patches -> 144 image tokens), and `turn2_tokens` sampled tokens (the answer).
One `Learner.update` = one mini-batch of one micro-batch of all rows: reference forward, policy
forward/backward, AdamW; float32, random bench-size weights (`common.get_size`), one CPU device, remat on.
"shared" encodes each prompt (and its image) once for its 8 rows; "per row" gives every row its own copy of
its prompt (`share_prefix=False`, the per-row computation in the same layout and program). Both run in the
same process, alternating after one warm-up each; medians. Peak memory: XLA's
`jit(update).lower(...).compile().memory_analysis()` of each program. Sanity: both give the same loss.

  python -m bench.shared_update                  # bench size, 2 prompts x 8 rows
  python -m bench.shared_update --size=smoke --repeats=1 --out_dir=/tmp/su
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bench import common


def make_trajectories(cfg, prompts: int, generations: int, prompt_text: int, image_px: int, crop_px: int,
                      turn1_tokens: int, turn2_tokens: int, seed: int = 0):
  from mgpo_jax.rollout.trajectory import Trajectory
  rng = np.random.default_rng(seed)

  def image(px):
    g = np.array([1, px // cfg.vision.patch_size, px // cfg.vision.patch_size])
    n = int(np.prod(g))
    return rng.standard_normal((n, cfg.vision.patch_dim)).astype(np.float32), g, n // cfg.vision.merge_unit

  text = lambda n: list(rng.integers(10, cfg.vocab_size - 20, n))
  block = lambda n_tok: [cfg.vision_start_token_id] + [cfg.image_token_id] * n_tok + [cfg.vision_end_token_id]
  out = []
  for p in range(prompts):
    pv, g, n_tok = image(image_px)
    prompt = text(prompt_text // 2) + block(n_tok) + text(prompt_text - prompt_text // 2)
    for j in range(generations):
      cpv, cg, c_tok = image(crop_px)
      turn2 = text(4) + block(c_tok) + text(6)
      ids = prompt + text(turn1_tokens) + turn2 + text(turn2_tokens)
      mask = [0] * len(prompt) + [1] * turn1_tokens + [0] * len(turn2) + [1] * turn2_tokens
      s2 = len(prompt) + turn1_tokens + len(turn2)
      mask = np.asarray(mask, np.int32)
      logp = np.where(mask > 0, -rng.uniform(0.05, 3.0, len(ids)), 0.0).astype(np.float32)
      out.append(Trajectory(token_ids=np.asarray(ids, np.int32), turn_mask=mask, logprobs=logp,
                            turn_spans=[(len(prompt), len(prompt) + turn1_tokens), (s2, s2 + turn2_tokens)],
                            images=[], pixel_values=[pv, cpv], image_grids=[g, cg], texts=["", ""], box_valid=[True],
                            reward=float(rng.integers(0, 2)), sample_index=p, generation_index=j))
  return out


def run(size: str, prompts: int, generations: int, prompt_text: int, image_px: int, crop_px: int,
        turn1_tokens: int, turn2_tokens: int, repeats: int, out_dir: str | None) -> dict:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mgpo_jax.learner import Learner, LearnerConfig, OldLogpSource, OptimConfig
  from mgpo_jax.models.qwen2_5_vl import Qwen25VL
  from mgpo_jax.parallel import sharding as shd
  from mgpo_jax.rollout.trajectory import layout_sizes, to_train_batch

  cfg = common.get_size(size)
  trajs = make_trajectories(cfg, prompts, generations, prompt_text, image_px, crop_px, turn1_tokens, turn2_tokens)
  sizes = layout_sizes(trajs, cfg.vision, cfg.image_token_id)
  batch = to_train_batch(trajs, [t.sample_index for t in trajs], seq_bucket=sizes.tokens, patch_bucket=sizes.patches,
                         max_images=1, pad_id=0, vision_cfg=cfg.vision, max_turns=2, image_token_id=cfg.image_token_id,
                         prefix_bucket=sizes.prefix_tokens, prefix_patch_bucket=sizes.prefix_patches,
                         prefix_max_images=1)
  R = len(trajs)
  _, params = nnx.split(Qwen25VL(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  lcfg = LearnerConfig(micro_batch_size=R, num_mini_batches=1, logprob_chunk_size=256, remat=True,
                       old_logp=OldLogpSource.SAMPLER, optim=OptimConfig(learning_rate=1e-6))
  variants = {}
  for name, share in (("shared", True), ("per row", False)):
    learner = Learner(dataclasses.replace(lcfg, share_prefix=share), cfg, mesh)
    state = learner.init(nnx.merge(learner.graphdef, jax.tree.map(jnp.copy, params)))
    ref = learner.reference_params(params)
    (mini,) = learner.split_rollout(batch)
    rewards, groups = jnp.asarray(batch.rewards_B), jnp.asarray(batch.group_ids_B)
    compiled = learner._update.lower(state, ref, mini, rewards, groups, jnp.asarray(0, jnp.int32)).compile()  # pylint: disable=protected-access
    ma = compiled.memory_analysis()
    mem = {k: int(getattr(ma, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                                           "temp_size_in_bytes")} if ma is not None else {}
    variants[name] = dict(learner=learner, state=state, ref=ref, mini=mini, rewards=rewards, groups=groups, mem=mem,
                          prefixes=int(mini.prefix_ids_GS.shape[1]), losses=[])

  def step(name):
    v = variants[name]
    v["state"], metrics = v["learner"].update(v["state"], v["ref"], v["mini"], v["rewards"], v["groups"], 0)
    v["losses"].append(float(jax.device_get(metrics["loss"])))
    jax.block_until_ready(v["state"])

  warm = {name: common.timed(lambda n=name: step(n))[0] for name in variants}
  first_loss = {name: v["losses"][0] for name, v in variants.items()}
  times = common.alternate({name: (lambda n=name: step(n)) for name in variants}, repeats)
  base = common.median(times["per row"])
  rows = []
  for name, v in variants.items():
    mem = v["mem"]
    peak = (mem["argument_size_in_bytes"] + mem["output_size_in_bytes"] - mem["alias_size_in_bytes"]
            + mem["temp_size_in_bytes"]) if mem else None
    rows.append({"variant": name, "update s (median)": common.median(times[name]),
                 "speed-up vs per row": base / common.median(times[name]),
                 "prefix slots": v["prefixes"], "temp MiB": mem.get("temp_size_in_bytes", 0) / 2**20,
                 "peak MiB (args+out-alias+temp)": (peak or 0) / 2**20, "compile+first s": warm[name],
                 "all s": [round(t, 2) for t in times[name]]})
  same = np.isclose(first_loss["shared"], first_loss["per row"], rtol=1e-4, atol=1e-6)
  meta = {"machine": common.machine_info(), "size": size, "rows": f"{prompts} prompts x {generations}",
          "prefix_tokens (prompt minus its last token)": sizes.prefix_tokens, "prompt_image_patches": sizes.prefix_patches,
          "continuation_tokens": sizes.tokens, "crop_patches": sizes.patches, "turn1_tokens": turn1_tokens,
          "turn2_tokens": turn2_tokens, "repeats": repeats, "first_loss": first_loss, "same_loss": bool(same)}
  print(common.markdown_table(rows))
  print(meta)
  if not same:
    raise AssertionError(f"shared and per-row updates gave different losses: {first_loss}")
  if out_dir is not None:
    common.write_results("shared_update", "Learner update: shared prompt prefix vs per row",
                         [("Update time and compiled memory", rows)], meta, out_dir=out_dir)
  return {"rows": rows, "meta": meta}


def main(argv=None):
  common.mgpo_workload_main(__doc__, run, argv)


if __name__ == "__main__":
  main()
