"""Does the 1-square (stage-1) model read a square's position from the background's position code, or
from the rotary positions of its tokens? Same scenes, three backgrounds: the normal code, a flat
background (no code), the code reversed in both axes (a code that says "mirror"). Metric: share of
scenes where the true box has lower teacher-forced NLL than its point mirror (224 - coords).
env: INIT, NEV"""
import dataclasses, os, json, numpy as np, jax, jax.numpy as jnp
from flax import nnx
from mgpo_jax.repro import pretrain as P
from mgpo_jax.data import scenes
from mgpo_jax.learner.step import sequence_logprobs, token_loss_mask
from mgpo_jax.models.qwen2_5_vl import params as params_lib, tokenizer as tok_lib
from mgpo_jax.models.qwen2_5_vl.chat import special_token_ids
from mgpo_jax.rollout import engine as engine_lib, trajectory as traj_lib
E = os.environ; INIT = E.get("INIT", "/work/run17/cur1/hf"); NEV = int(E.get("NEV", 64)); N = int(E.get("N", 1))
cfg = dataclasses.replace(P.PretrainConfig(), scene=dataclasses.replace(P.PretrainConfig.scene, num_objects=N))
tok = tok_lib.load_tokenizer(INIT); model = params_lib.from_pretrained(INIT); mcfg = model.cfg; sp = special_token_ids(tok)
rcfg = dataclasses.replace(cfg.rollout(engine_lib.RolloutMode.SINGLE_TURN), prompts=P.refer_prompts(cfg.prompt_style))
class Shim:
  mode = "normal"
  def __getattr__(self, k): return getattr(np, k)
  def linspace(self, a, b, n, dtype=None):
    if Shim.mode == "flat": return np.full(n, 0.5, dtype)
    if Shim.mode == "reversed": return np.linspace(b, a, n, dtype=dtype)
    return np.linspace(a, b, n, dtype=dtype)
scenes.np = Shim()
def rows_for(specs):
  samples = [{"id": f"r{i}", "question": q, "choices": None, "answer": "A", "image": img} for i, (img, q, a) in enumerate(specs)]
  eng = engine_lib.RolloutEngine(P.ScriptedSampler(mcfg, tok, lambda r, t: specs[r][2], sp.pad, sp.im_end), tok, rcfg)
  return traj_lib.to_train_batch(eng.run(samples, jax.random.key(0)).trajectories, list(range(len(specs))), seq_bucket=192,
      patch_bucket=256, max_images=1, pad_id=sp.pad, vision_cfg=mcfg.vision, max_turns=1, image_token_id=mcfg.image_token_id)
@jax.jit
def row_nll(b):
  logp, _ = sequence_logprobs(model, b, chunk_size=1024, temperature=1.0, compute_entropy=False)
  return -jnp.sum(logp * token_loss_mask(b), 1)
out = {}
for mode in ("normal", "flat", "reversed"):
  Shim.mode = mode; specs = []
  for s in P._seeds(99, NEV, 5):
    img, objs, k, _ = P._decoded(s, cfg); t = objs[k]
    x1, y1, x2, y2 = t.box_in; mir = (224 - x2, 224 - y2, 224 - x1, 224 - y1)
    q = P.REFER_QUESTION.format(color=t.color)
    specs += [(img, q, P.box_text(t.box_in, f"{t.color} square")), (img, q, P.box_text(mir, f"{t.color} square"))]
  nll = np.asarray(row_nll(rows_for(specs))).reshape(-1, 2)
  out[mode] = {"true_beats_mirror": float(np.mean(nll[:, 0] < nll[:, 1])), "true_nll": float(nll[:, 0].mean()), "mirror_nll": float(nll[:, 1].mean())}
  print(mode, out[mode], flush=True)
print(json.dumps({"init": INIT, "n": NEV, **out}))
