"""Scratch learnability probe: referring grounding + close-up perception on position-coded scenes."""
import os, sys, time, json, functools
import numpy as np
import jax, jax.numpy as jnp
import optax
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, "/work/scratch/final"); import scenes
from mgpo_jax import tokenizer as tok_lib
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig, preprocess_image, num_image_tokens
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.rollout.trajectory import Trajectory, to_train_batch
from mgpo_jax.train import sft, optim
from mgpo_jax.train.step import sequence_logprobs, token_loss_mask

STEPS = int(os.environ.get("STEPS", 400)); BS = int(os.environ.get("BS", 32)); LR = float(os.environ.get("LR", 1e-3))
HID = int(os.environ.get("HID", 128)); LAYERS = int(os.environ.get("LAYERS", 4)); VH = int(os.environ.get("VH", 64))
VD = int(os.environ.get("VD", 2)); MIX = float(os.environ.get("MIX", 0.5)); OUT = os.environ.get("OUT", "/tmp/probe.json")
LO = float(os.environ.get("LO", 2)); CROP = float(os.environ.get("CROP", 1.5)); VHEADS = int(os.environ.get("VHEADS", 2))
IMG = ImageProcessorConfig(min_pixels=220 * 220, max_pixels=230 * 230)

corpus = list(tok_lib._default_corpus())
for c in scenes.COLORS:
  corpus += [f"Where is the {c} square?", f"What color is the dot on the {c} square?"]
corpus += [", ".join(scenes.OPTIONS), "Answer with the letter in \\boxed{}.", "Give its box as JSON."]
corpus += [sft.box_text((x, y, x + 36, y + 36), f"{c} square") for x in range(0, 200, 7) for y in (0, 50, 100) for c in scenes.COLORS]
corpus += [sft.answer_text(l) for l in "ABCD"]
tok = tok_lib.build_tokenizer("/tmp/probe_tok", vocab_size=1024, corpus=corpus * 3)
sp = tok_lib.special_token_ids(tok)
cfg = Qwen25VLConfig(vocab_size=1088, hidden_size=HID, intermediate_size=4 * HID, num_layers=LAYERS, num_heads=4,
                     num_kv_heads=2, mrope_section=(1, 3, 12) if HID == 128 else (2, 6, 8), rope_theta=1e3,
                     tie_word_embeddings=False, image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                     vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end, bos_token_id=None,
                     eos_token_id=sp.im_end, pad_token_id=sp.pad,
                     vision=VisionConfig(depth=VD, hidden_size=VH, intermediate_size=2 * VH, num_heads=VHEADS,
                                         out_hidden_size=HID, window_size=112, fullatt_block_indexes=(VD - 1,)))


def row(image, question, answer):
  pv, grid = preprocess_image(image, IMG)
  msgs = [{"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
  prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
  prompt = tok_lib.expand_image_pads(prompt, [num_image_tokens(grid, 2)])
  p_ids = tok.encode(prompt, add_special_tokens=False)
  a_ids = tok.encode(answer, add_special_tokens=False) + [sp.im_end]
  ids = np.asarray(p_ids + a_ids, np.int32)
  m = np.zeros(len(ids), np.int32); m[len(p_ids):] = 1
  return Trajectory(token_ids=ids, turn_mask=m, logprobs=np.zeros(len(ids), np.float32),
                    turn_spans=[(len(p_ids), len(ids))], images=[image], pixel_values=[pv], image_grids=[grid], texts=[answer])


TRAIN_CROP = [False]
def make(rng, kind):
  img, objs = scenes.render_scene(rng, scenes.SceneConfig(dot_side=int(os.environ.get("DOT", 3))))
  o = objs[int(rng.integers(len(objs)))]
  if kind == "ref":
    return row(img, f"Where is the {o.color} square? Give its box as JSON.", sft.box_text(o.box_in, f"{o.color} square")), "ref"
  # close-up: a square crop (orig px) holding the object, side 1x..2.2x the object's
  x0, y0, x1, y1 = o.box; n = x1 - x0
  sc = 2; j = int(rng.integers(-6, 7)) * sc, int(rng.integers(-6, 7)) * sc
  if TRAIN_CROP[0] and rng.random() < 0.5:
    dot = sc * int(os.environ.get("DOT", 3)); cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    side = int(np.exp(rng.uniform(np.log(2 * dot), np.log(n))))
    f = side / n; cx0, cy0 = cx - side // 2 + int(j[0] * f), cy - side // 2 + int(j[1] * f)
  else:
    cx0, cy0, side = x0 + j[0], y0 + j[1], n
  cx0, cy0 = min(max(cx0, 0), img.width - side), min(max(cy0, 0), img.height - side)
  crop = img.crop((cx0, cy0, cx0 + side, cy0 + side))
  opts = "\n".join(f"{l}. {p}" for l, p in zip("ABCD", scenes.OPTIONS))
  letter = "ABCD"[scenes.OPTIONS.index(o.dot)]
  return row(crop, f"What color is the dot on the {o.color} square?\nOptions:\n{opts}\nAnswer with the letter in \\boxed{{}}.",
             sft.answer_text(letter)), "per"


def batch(rng, n, kinds=None):
  rows = [make(rng, ("ref" if rng.random() < MIX else "per") if kinds is None else kinds) for _ in range(n)]
  return to_train_batch([r for r, _ in rows], list(range(n)), seq_bucket=160, patch_bucket=256, max_images=1,
                        pad_id=sp.pad, vision_cfg=cfg.vision, max_turns=1, image_token_id=cfg.image_token_id), [k for _, k in rows]


model = params_lib.init_model(cfg, seed=0)
print("params", params_lib.num_params(cfg), flush=True)
tx = optim.make_optimizer(optim.OptimConfig(learning_rate=LR, weight_decay=0.01, grad_clip_norm=1.0,
                                            schedule=optim.Schedule.COSINE, warmup_steps=30, total_steps=STEPS, min_lr_ratio=0.1))
tr = sft.SFTTrainer(model, tx, 1024)


@jax.jit
def evalfn(params, b):
  from flax import nnx
  m = nnx.merge(tr.graphdef, params)
  logp, _ = sequence_logprobs(m, b, chunk_size=1024, temperature=1.0, compute_entropy=False)
  mask = token_loss_mask(b)
  nll = -jnp.sum(logp * mask, 1)
  exact = jnp.all(jnp.where(mask > 0, logp > np.log(0.5), True), 1)
  return nll, exact


TRAIN_CROP = [False]
erng = np.random.default_rng(12345)
evals = {k: batch(erng, 64, k)[0] for k in ("ref", "per")}
rng = np.random.default_rng(0)
TRAIN_CROP[0] = bool(int(os.environ.get('CURRIC', 1)))
log = []
t0 = time.time()
for step in range(1, STEPS + 1):
  b, _ = batch(rng, BS)
  m = tr.step(b)
  if step % 50 == 0 or step == STEPS:
    res = {"step": step, "loss": m["loss"], "t": round(time.time() - t0)}
    for k, eb in evals.items():
      nll, ex = jax.device_get(evalfn(tr.params(), eb))
      res[f"{k}_nll"] = float(nll.mean()); res[f"{k}_exact"] = float(ex.mean())
    print(res, flush=True); log.append(res)
json.dump(log, open(OUT, "w"))
