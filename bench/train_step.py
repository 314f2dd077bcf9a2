"""One GRPO update: our jitted learner vs the same step in PyTorch/transformers; model FLOPs utilisation.

The update is the MGPO one: forward + backward of the policy, forward of the frozen reference, masked
PPO-clip + k3 KL (coef 0.01) + entropy bonus (coef 0.001), token-mean, global-norm clipping at 1.0,
AdamW. Both sides load the same HF directory, get the same batch (R rows of T tokens, two turns with an
image each: a 224 px "original" and a 168 px "crop"), float32, no rematerialisation (the PyTorch step has
none either).

  ours    `train.Learner.update` (one mini-batch of one micro-batch of R rows)
  theirs  transformers forward (policy, and reference under no_grad) -> log_softmax -> the same loss ->
          backward -> clip_grad_norm_ -> torch.optim.AdamW

Sanity: the first step of each side starts from the same weights, so the loss and the pre-clip gradient
norm must agree. MFU = analytic model FLOPs / step time / the f32 matmul FLOP/s measured in this run
(`common.matmul_peak_flops`). Model FLOPs = 3x forward (policy fwd + bwd) + 1x forward (reference), with
forward = 2 * matmul params * tokens + dense attention (text: T x T; vision: per window / per image).

  python -m bench.train_step                        # -> bench/results/train_step.{json,md}
  python -m bench.train_step --size=smoke --rows=4 --seq=160 --repeats=1 --out_dir=/tmp/t
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

import numpy as np

from bench import common

# (pixels, pixels) of the two images of each row: the original and the crop.
IMAGES_PX = (224, 168)


@dataclasses.dataclass(frozen=True)
class TrainBenchConfig:
  size: str = "bench"
  rows: int = 8
  seq: int = 256
  samples_per_prompt: int = 4
  repeats: int = 3
  attn: str = "sdpa"
  learning_rate: float = 1e-6
  cost_analysis: bool = True   # compile once more to read XLA's own FLOP count
  breakdown: bool = True       # time the update's parts as separate programs (ours)
  seed: int = 0
  profile_dir: str = ""
  cache_root: str = ""

  def __post_init__(self):
    if self.rows % self.samples_per_prompt:
      raise ValueError(f"rows={self.rows} must be a multiple of samples_per_prompt={self.samples_per_prompt}")
    if self.attn not in ("sdpa", "eager"):
      raise ValueError(f"attn must be 'sdpa' or 'eager', got {self.attn!r}")


@dataclasses.dataclass
class Batch:
  """One batch in both layouts."""

  ids: np.ndarray            # int64 [R, T]
  pixel_values: np.ndarray   # f32 [sum patches, 1176], HF order (row, image)
  grid: np.ndarray           # int64 [R * 2, 3]
  loss_mask: np.ndarray      # f32 [R, T]: response tokens
  old_logp: np.ndarray       # f32 [R, T]
  rewards: np.ndarray        # f32 [R]
  group_ids: np.ndarray      # int32 [R]
  patches_per_image: tuple[int, ...]
  ours: object               # mgpo_jax.rl.batch.TrainBatch


def make_batch(cfg, rows: int, seq: int, samples_per_prompt: int, seed: int) -> Batch:
  """Rows of exactly `seq` tokens: per turn [text, image block, text, response]."""
  from PIL import Image
  from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig, preprocess_image
  from mgpo_jax.rollout.trajectory import Trajectory, layout_sizes, to_train_batch
  rng = np.random.default_rng(seed)
  text = lambda n: list(rng.integers(10, cfg.vocab_size - 20, size=n))
  ids, loss_mask, pvs, grids = [], [], [], []
  per_image, prompts_per_row, resp_per_row, images_per_row = [], [], [], []
  for _ in range(rows):
    prompts, images = [], []
    for px in IMAGES_PX:
      icfg = ImageProcessorConfig(min_pixels=px * px, max_pixels=px * px)
      pv, g = preprocess_image(Image.fromarray(rng.integers(0, 256, (px, px, 3), dtype=np.uint8)), icfg)
      n_img = int(np.prod(g)) // cfg.vision.merge_unit
      prompts.append(text(4) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
                     + [cfg.vision_end_token_id] + text(4))
      images.append((pv, g))
    budget = seq - sum(len(p) for p in prompts)
    if budget < 4:
      raise ValueError(f"seq={seq} is too short for two image turns ({seq - budget} prompt tokens)")
    resp = (budget // 2, budget - budget // 2)
    prompts_per_row.append(prompts)
    resp_per_row.append(resp)
    images_per_row.append(images)
    row, mask = [], []
    for p, n in zip(prompts, resp):
      row += p + text(n)
      mask += [0.0] * len(p) + [1.0] * n
    ids.append(row)
    loss_mask.append(mask)
    pvs += [pv for pv, _ in images]
    grids += [g for _, g in images]
    per_image = [int(np.prod(g)) for _, g in images]
  ids = np.asarray(ids, np.int64)
  loss_mask = np.asarray(loss_mask, np.float32)
  old_logp = np.where(loss_mask > 0, -rng.uniform(0.05, 3.0, size=ids.shape), 0.0).astype(np.float32)
  rewards = rng.integers(0, 2, size=rows).astype(np.float32)
  group_ids = (np.arange(rows) // samples_per_prompt).astype(np.int32)
  # Ours: the learner's shared-prefix layout (every row's prompt is its own here: random text per row).
  trajs = []
  for b in range(rows):
    p0 = len(prompts_per_row[b][0])
    n0 = resp_per_row[b][0]
    p1 = len(prompts_per_row[b][1])
    spans = [(p0, p0 + n0), (p0 + n0 + p1, seq)]
    trajs.append(Trajectory(token_ids=ids[b].astype(np.int32), turn_mask=loss_mask[b].astype(np.int32),
                            logprobs=old_logp[b], turn_spans=spans, images=[],
                            pixel_values=[pv for pv, _ in images_per_row[b]],
                            image_grids=[g for _, g in images_per_row[b]], texts=["", ""],
                            box_valid=[True], reward=float(rewards[b])))
  sizes = layout_sizes(trajs, cfg.vision, cfg.image_token_id)
  ours = to_train_batch(trajs, list(group_ids), seq_bucket=sizes.tokens, patch_bucket=per_image[1], max_images=1,
                        pad_id=0, vision_cfg=cfg.vision, max_turns=2, image_token_id=cfg.image_token_id,
                        prefix_bucket=sizes.prefix_tokens, prefix_patch_bucket=per_image[0], prefix_max_images=1)
  return Batch(ids=ids, pixel_values=np.concatenate(pvs), grid=np.stack(grids).astype(np.int64),
               loss_mask=loss_mask, old_logp=old_logp, rewards=rewards, group_ids=group_ids,
               patches_per_image=tuple(per_image), ours=ours)


def model_flops(cfg, b: Batch) -> dict[str, float]:
  """Analytic model FLOPs of one update: policy fwd + bwd (3x fwd) + reference fwd (1x)."""
  R, T = b.ids.shape
  fwd = common.text_forward_flops(cfg, R, T) + R * sum(common.vision_forward_flops(cfg, p)
                                                       for p in b.patches_per_image)
  return {"forward": fwd, "update": 4.0 * fwd}


# ------------------------------------------------------------------------------------------------
# Ours.
# ------------------------------------------------------------------------------------------------


class Ours:

  def __init__(self, hf_dir: str, b: Batch, samples_per_prompt: int, lr: float):
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from mgpo_jax.parallel import sharding as shd
    from mgpo_jax.models import qwen2_5_vl
    from mgpo_jax.learner import Learner, LearnerConfig, OldLogpSource, OptimConfig
    self.jax = jax
    R, T = b.ids.shape
    policy = qwen2_5_vl.from_pretrained(hf_dir)
    reference = qwen2_5_vl.from_pretrained(hf_dir)
    self.lcfg = LearnerConfig(micro_batch_size=R, num_mini_batches=1, logprob_chunk_size=T, remat=False,
                              old_logp=OldLogpSource.SAMPLER, optim=OptimConfig(learning_rate=lr))
    self.learner = Learner(self.lcfg, policy.cfg, shd.make_mesh((1, 1, 1), jax.devices()[:1]))
    self.state = self.learner.init(policy)
    self.ref = self.learner.reference_params(nnx.split(reference, nnx.Param, ...)[1])
    (self.mini,) = self.learner.split_rollout(b.ours)
    self.rewards = jnp.asarray(b.rewards)
    self.group_ids = jnp.asarray(b.group_ids)

  def step(self) -> dict[str, float]:
    self.state, metrics = self.learner.update(self.state, self.ref, self.mini, self.rewards, self.group_ids, 0)
    metrics = self.jax.device_get(metrics)
    self.jax.block_until_ready(self.state)
    return {k: float(v) for k, v in metrics.items()}

  def breakdown(self, repeats: int) -> dict[str, float]:
    """Fastest of `repeats` rounds of the update's parts, each its own jitted program, alternating with
    the whole update (ours only; the fastest repeat is the least disturbed by other load):
    policy forward (old log-probs), reference fwd + policy fwd/bwd (grads), clip + AdamW alone."""
    import optax
    jax = self.jax
    params = self.state.params
    tx = self.learner.tx
    opt = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
    fns = {
        "update": self.step,
        "forward": lambda: jax.block_until_ready(self.learner.old_logprobs(self.state.params, self.mini)),
        "grads": lambda: jax.block_until_ready(self.learner.grads_and_metrics(
            self.state.params, self.ref, self.mini, self.rewards, self.group_ids, 0)),
        "optimizer": lambda: jax.block_until_ready(opt(self.state.params, self.state.opt_state, self.state.params)),
    }
    for name, f in fns.items():
      if name != "update":
        f()  # compile
    del params
    t = common.alternate(fns, repeats, pause_s=0.0)
    return {k: min(v) for k, v in t.items()}

  def cost_analysis_flops(self) -> float | None:
    """XLA's FLOP count of the compiled update. XLA counts every while-loop body ONCE (scans over
    layers, micro-batches and log-prob chunks), so this is a lower bound, not the executed count."""
    jax = self.jax
    fn = jax.jit(lambda s, r, m, rw, g: self.learner.update(s, r, m, rw, g, 0))
    cost = fn.lower(self.state, self.ref, self.mini, self.rewards, self.group_ids).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


# ------------------------------------------------------------------------------------------------
# Theirs.
# ------------------------------------------------------------------------------------------------


class Theirs:
  """The same update written with transformers + torch."""

  def __init__(self, hf_dir: str, b: Batch, attn: str, lr: float, image_token_id: int, loss_cfg):
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    self.torch = torch
    self.policy = common.load_torch_model(hf_dir, attn).train()
    self.ref = common.load_torch_model(hf_dir, attn)
    for p in self.ref.parameters():
      p.requires_grad_(False)
    self.opt = torch.optim.AdamW(self.policy.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    ids = torch.as_tensor(b.ids)
    self.inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                       pixel_values=torch.as_tensor(b.pixel_values), image_grid_thw=torch.as_tensor(b.grid),
                       mm_token_type_ids=(ids == image_token_id).int())
    self.targets = ids[:, 1:]
    # Token t is predicted at t - 1: drop position 0 from every per-token tensor.
    self.mask = torch.as_tensor(b.loss_mask)[:, 1:]
    self.old_logp = torch.as_tensor(b.old_logp)[:, 1:]
    self.adv = torch.as_tensor(grpo_advantages(b.rewards, b.group_ids))[:, None]
    self.cfg = loss_cfg

  def _logp(self, model, with_entropy: bool):
    torch = self.torch
    logits = model(**self.inputs).logits[:, :-1].float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, self.targets[..., None])[..., 0]
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, ent

  def step(self) -> dict[str, float]:
    torch, c = self.torch, self.cfg
    self.opt.zero_grad(set_to_none=True)
    with torch.no_grad():
      ref_logp, _ = self._logp(self.ref, with_entropy=False)
    logp, ent = self._logp(self.policy, with_entropy=True)
    m = self.mask
    lim = c.log_ratio_clip
    ratio = torch.exp(torch.clamp(logp - self.old_logp, -lim, lim))
    pg = torch.maximum(-self.adv * ratio, -self.adv * torch.clamp(ratio, 1 - c.clip_ratio_low, 1 + c.clip_ratio_high))
    d = torch.clamp(ref_logp - logp, -lim, lim)
    kl = torch.exp(d) - d - 1
    loss_tok = pg + c.kl_coef * kl - c.entropy_coef * ent
    loss = (loss_tok * m).sum() / m.sum()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
    self.opt.step()
    return {"loss": loss.item(), "grad_norm": grad_norm.item()}


def grpo_advantages(rewards: np.ndarray, group_ids: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """(r - mean_g) / (std_g(ddof=1) + eps); 0 for all-equal groups (as `rl.advantages.grpo`)."""
  adv = np.zeros_like(rewards, np.float32)
  for g in np.unique(group_ids):
    sel = group_ids == g
    r = rewards[sel]
    if len(r) > 1 and r.max() != r.min():
      adv[sel] = (r - r.mean()) / (r.std(ddof=1) + eps)
  return adv


def run(cfg: TrainBenchConfig, out_dir: str | None = None) -> dict:
  import jax
  mcfg = common.get_size(cfg.size)
  hf_dir = common.hf_dir_for(cfg.size, root=cfg.cache_root or None)
  load = os.getloadavg()
  b = make_batch(mcfg, cfg.rows, cfg.seq, cfg.samples_per_prompt, cfg.seed)
  ours = Ours(hf_dir, b, cfg.samples_per_prompt, cfg.learning_rate)
  theirs = Theirs(hf_dir, b, cfg.attn, cfg.learning_rate, mcfg.image_token_id, ours.lcfg.loss)
  # First steps from identical weights: the sanity check, and our compile (warm-up).
  warm_ours, m_ours = common.timed(ours.step)
  warm_theirs, m_theirs = common.timed(theirs.step)
  peak0 = common.matmul_peak_flops()
  if cfg.profile_dir:
    with jax.profiler.trace(os.path.join(cfg.profile_dir, "train_step")):
      ours.step()
  t = common.alternate({"ours": ours.step, "theirs": theirs.step}, cfg.repeats)
  peak1 = common.matmul_peak_flops()
  parts = ours.breakdown(cfg.repeats) if cfg.breakdown else None
  peak = common.median([peak0["median_flops"], peak1["median_flops"]])
  torch_peak = common.torch_matmul_peak_flops()
  xla_flops = ours.cost_analysis_flops() if cfg.cost_analysis else None
  flops = model_flops(mcfg, b)
  s_ours, s_theirs = common.median(t["ours"]), common.median(t["theirs"])
  best_peak = max(peak0["best_flops"], peak1["best_flops"])
  row = {
      "rows": cfg.rows, "seq": cfg.seq,
      "ours_s": s_ours, "theirs_s": s_theirs, "speedup": s_theirs / s_ours,
      "ours_warmup_s": warm_ours, "theirs_first_s": warm_theirs,
      "model_tflop": flops["update"] / 1e12,
      "ours_gflop_s": flops["update"] / s_ours / 1e9, "theirs_gflop_s": flops["update"] / s_theirs / 1e9,
      "matmul_peak_gflop_s": peak / 1e9,
      "ours_mfu": flops["update"] / s_ours / peak, "theirs_mfu": flops["update"] / s_theirs / peak,
  }
  # The machine is shared: the fastest repeat of each side against the best matmul is the quiet-machine view.
  best = {
      "ours_min_s": min(t["ours"]), "theirs_min_s": min(t["theirs"]),
      "speedup_min": min(t["theirs"]) / min(t["ours"]), "matmul_best_gflop_s": best_peak / 1e9,
      "ours_mfu_min": flops["update"] / min(t["ours"]) / best_peak,
      "theirs_mfu_min": flops["update"] / min(t["theirs"]) / best_peak,
  }
  part_rows = []
  if parts:
    up = parts["update"]
    part_rows = [{"part": k, "s": v, "share_of_update": v / up} for k, v in (
        ("whole update (this loop's fastest)", up),
        ("policy forward (old log-probs program)", parts["forward"]),
        ("reference fwd + policy fwd/bwd (grads program)", parts["grads"]),
        ("  of which policy fwd/bwd (grads - forward)", parts["grads"] - parts["forward"]),
        ("clip + AdamW (own program)", parts["optimizer"]),
        ("update - grads - optimizer (state copies, metrics, dispatch)", up - parts["grads"] - parts["optimizer"]),
        ("forward at the best measured matmul peak (analytic FLOPs)", flops["forward"] / best_peak),
    )]
  sanity = {
      "ours_loss": m_ours["loss"], "theirs_loss": m_theirs["loss"],
      "ours_grad_norm": m_ours["grad_norm"], "theirs_grad_norm": m_theirs["grad_norm"],
      "loss_rel_diff": abs(m_ours["loss"] - m_theirs["loss"]) / max(abs(m_theirs["loss"]), 1e-12),
      "grad_norm_rel_diff": abs(m_ours["grad_norm"] - m_theirs["grad_norm"]) / max(m_theirs["grad_norm"], 1e-12),
  }
  flop_rows = [{"source": "analytic model FLOPs (3x fwd policy + 1x fwd reference)", "tflop": flops["update"] / 1e12},
               {"source": "XLA cost_analysis of our compiled update (loop bodies counted once: lower bound)",
                "tflop": (xla_flops or float("nan")) / 1e12}]
  print(common.markdown_table([row]), common.markdown_table([best]), common.markdown_table([sanity]),
        common.markdown_table(part_rows) if part_rows else "", flush=True)
  meta = {"bench": "train_step", "config": dataclasses.asdict(cfg), "hf_dir": hf_dir,
          "params": common.param_counts(mcfg), "machine": common.machine_info(), "loadavg_at_start": load,
          "matmul_peak_jax": [peak0, peak1], "matmul_peak_torch": torch_peak, "raw_s": t,
          "patches_per_image": b.patches_per_image}
  notes = [
      f"{cfg.size} model ({meta['params']['total'] / 1e6:.0f}M params), float32, {cfg.rows} rows x {cfg.seq} "
      f"tokens, 2 images per row ({b.patches_per_image} patches); transformers attn_implementation={cfg.attn}.",
      f"Times are medians of {cfg.repeats} alternating steps after one warm-up step each (ours compiles there).",
      "MFU = analytic model FLOPs / step time / jnp.dot f32 2048^3 FLOP/s measured in the same run "
      f"(median {peak / 1e9:.1f} GFLOP/s; torch's own matmul: {torch_peak['median_flops'] / 1e9:.1f} GFLOP/s).",
      "Sanity: the first update of each side starts from the same weights; loss and pre-clip grad norm agree.",
  ]
  sections = [("Step time", [row]), ("Fastest repeat (quiet-machine view)", [best]),
              ("Sanity (first step, same weights)", [sanity]), ("FLOPs per update", flop_rows)]
  if part_rows:
    sections.append(("Where our step's time goes (separate programs, fastest of the repeats)", part_rows))
  common.write_results("train_step", "GRPO update: jitted learner vs PyTorch step", sections, meta, notes, out_dir)
  return {"meta": meta, "row": row, "best": best, "sanity": sanity, "flops": flop_rows, "parts": part_rows}


def parse_args(argv: Sequence[str]) -> tuple[TrainBenchConfig, str | None]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  d = TrainBenchConfig()
  p.add_argument("--size", default=d.size, choices=sorted(common.SIZES))
  p.add_argument("--rows", type=int, default=d.rows)
  p.add_argument("--seq", type=int, default=d.seq)
  p.add_argument("--repeats", type=int, default=d.repeats)
  p.add_argument("--attn", default=d.attn, choices=("sdpa", "eager"))
  p.add_argument("--no_cost_analysis", action="store_true")
  p.add_argument("--no_breakdown", action="store_true")
  p.add_argument("--profile_dir", default="")
  p.add_argument("--cache_root", default="")
  p.add_argument("--out_dir", default=None)
  a = p.parse_args(argv)
  cfg = TrainBenchConfig(size=a.size, rows=a.rows, seq=a.seq, repeats=a.repeats, attn=a.attn,
                         cost_analysis=not a.no_cost_analysis, breakdown=not a.no_breakdown,
                         profile_dir=a.profile_dir, cache_root=a.cache_root)
  return cfg, a.out_dir


if __name__ == "__main__":
  run(*parse_args(sys.argv[1:]))
