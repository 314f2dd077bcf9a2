"""Issue 17 lookup probe: does the model learn to pick the square a colour word names?

Tasks (rows built like pretrain's, through the rollout engine's real prompt):
  refer  "Where is the <c> square? Give its box as JSON." -> box JSON   (colour -> position lookup)
  name   "What color is the square at [x1, y1, x2, y2]? Give its box as JSON." -> "<c>"  (position -> colour)
Metric (no decoding): lookup accuracy = over held-out scenes, the share where the target square's box
has the lowest teacher-forced NLL among all squares' boxes (chance 1/N). name accuracy likewise over colours.
  list   "List the squares." -> "The squares: red [x1, y1, x2, y2], green [...]." (colours in a fixed order);
         with LIST_TIGHT=1 "The squares: red056,084,092,120; green..." (the colour token directly followed by
         its box, so the lookup at the colour token is what predicts the next token)
list metric: the true list vs the list with the boxes rotated by one square (chance 1/2).
env: INIT, N (squares), STEPS, LR, W (weights of refer,name,list rows; default 1,1,0), EVAL, NEV, OUT, SEED,
     SAVE (export the trained model), LABEL_FIRST=1 (refer answers as [{"label": ..., "bbox_2d": ...}])
"""
import dataclasses, json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from mgpo_jax.repro import pretrain as P
from mgpo_jax.data import scenes
from mgpo_jax.learner import optim, sft
from mgpo_jax.learner.step import sequence_logprobs, token_loss_mask
from mgpo_jax.models.qwen2_5_vl import params as params_lib, tokenizer as tok_lib
from mgpo_jax.models.qwen2_5_vl.chat import special_token_ids
from mgpo_jax.rollout import engine as engine_lib
from mgpo_jax.rollout import trajectory as traj_lib

E = os.environ
INIT = E.get("INIT", "/work/run17/cur1/hf"); N = int(E.get("N", 2)); STEPS = int(E.get("STEPS", 400))
LR = float(E.get("LR", 1e-3)); WTS = [float(v) for v in E.get("W", "1,1,0").split(",")]; EVAL = int(E.get("EVAL", 100)); OUT = E.get("OUT", "/tmp/lk.jsonl")
SEED = int(E.get("SEED", 0)); LABEL_FIRST = E.get("LABEL_FIRST", "") == "1"; BS = int(E.get("BS", 32)); HEADS_ONLY = E.get("FREEZE", "")
cfg = dataclasses.replace(P.PretrainConfig(), scene=dataclasses.replace(P.PretrainConfig.scene, num_objects=N))
tok = tok_lib.load_tokenizer(INIT); model = params_lib.from_pretrained(INIT); mcfg = model.cfg
sp = special_token_ids(tok)
rcfg = dataclasses.replace(cfg.rollout(engine_lib.RolloutMode.SINGLE_TURN), prompts=P.refer_prompts(cfg.prompt_style))
def box_text(box, label):
  if not LABEL_FIRST: return P.box_text(box, label)
  return f'```json\n[{{"label": "{label}", "bbox_2d": [{", ".join(str(int(v)) for v in box)}]}}]\n```'
LIST_Q = "List the squares."
COLS = list(scenes.COLORS)
def list_text(objs, boxes=None):
  order = sorted(range(len(objs)), key=lambda i: COLS.index(objs[i].color))
  boxes = boxes or [o.box_in for o in objs]
  if E.get("LIST_TIGHT") == "1":  # the colour word directly followed by its box: pretrain's list rows
    return P.list_text([dataclasses.replace(o, box_in=tuple(b)) for o, b in zip(objs, boxes)])
  return "The squares: " + ", ".join(f"{objs[i].color} [{', '.join(str(int(v)) for v in boxes[i])}]" for i in order) + "."
NAME_Q = "What color is the square at [{}, {}, {}, {}]?"

def rows_for(specs):
  """specs: list of (img, question, answer_text)."""
  samples = [{"id": f"r{i}", "question": q, "choices": None, "answer": "A", "image": img} for i, (img, q, a) in enumerate(specs)]
  eng = engine_lib.RolloutEngine(P.ScriptedSampler(mcfg, tok, lambda r, t: specs[r][2], sp.pad, sp.im_end), tok, rcfg)
  return eng.run(samples, jax.random.key(0)).trajectories

def batch(trs):
  return traj_lib.to_train_batch(trs, list(range(len(trs))), seq_bucket=192, patch_bucket=256, max_images=1, pad_id=sp.pad,
                                 vision_cfg=mcfg.vision, max_turns=1, image_token_id=mcfg.image_token_id)

def scene(seed):
  img, objs, k, rng = P._decoded(seed, cfg)
  return img, objs, k

def spec(kind, img, objs, k, ans_idx=None):
  t = objs[k]; a = objs[k if ans_idx is None else ans_idx]
  if kind == "refer":
    return (img, P.REFER_QUESTION.format(color=t.color), box_text(a.box_in, f"{t.color} square"))  # label: the asked colour, only the box differs
  if kind == "list":
    return (img, LIST_Q, list_text(objs))
  return (img, NAME_Q.format(*t.box_in), a.color)

# held-out: per scene, one row per candidate answer
ev_seeds = P._seeds(99, int(E.get("NEV", 64)), 5)
ev = {}
for kind in ("refer", "name", "list"):
  specs, meta = [], []
  for s in ev_seeds:
    img, objs, k = scene(s)
    if kind == "refer":
      for j in range(N): specs.append(spec(kind, img, objs, k, j))
      meta.append((N, k))
    elif kind == "list":  # candidates: the true list, and the list with boxes rotated by one square
      bx = [o.box_in for o in objs]
      specs.append((img, LIST_Q, list_text(objs))); specs.append((img, LIST_Q, list_text(objs, bx[1:] + bx[:1])))
      meta.append((2, 0))
    else:  # name: candidates = the N colours present
      for j in range(N): specs.append((img, NAME_Q.format(*objs[k].box_in), objs[j].color))
      meta.append((N, k))
  ev[kind] = (batch(rows_for(specs)), meta)

tx = optim.make_optimizer(optim.OptimConfig(learning_rate=LR, weight_decay=0.01, grad_clip_norm=1.0, schedule=optim.Schedule.COSINE,
                                            warmup_steps=min(30, STEPS - 1), total_steps=STEPS, min_lr_ratio=0.1))
tr = sft.SFTTrainer(model, tx)

@jax.jit
def row_nll(params, b):
  m = nnx.merge(tr.graphdef, params)
  logp, _ = sequence_logprobs(m, b, chunk_size=1024, temperature=1.0, compute_entropy=False)
  return -jnp.sum(logp * token_loss_mask(b), 1)

def evaluate(step, extra):
  res = {"step": step, **extra}
  for kind, (b, meta) in ev.items():
    nll = np.asarray(jax.device_get(row_nll(tr.params(), b)))
    i, acc, tnll = 0, 0, 0.0
    for n, k in meta:
      acc += int(np.argmin(nll[i:i + n]) == k); tnll += nll[i + k]; i += n
    res[f"{kind}_acc"] = acc / len(meta); res[f"{kind}_nll"] = float(tnll / len(meta))
  print(json.dumps(res), flush=True)
  with open(OUT, "a") as f: f.write(json.dumps(res) + "\n")

rng = np.random.default_rng([SEED, 11]); t0 = time.time()
evaluate(0, {})
for step in range(1, STEPS + 1):
  kind = ["refer", "name", "list"][int(rng.choice(3, p=np.asarray(WTS) / sum(WTS)))]
  specs = []
  for s in P._seeds(SEED + 1000, BS, step):
    img, objs, k = scene(s)
    specs.append(spec(kind, img, objs, k))
  m = tr.step(batch(rows_for(specs)))
  if step % EVAL == 0 or step == STEPS:
    evaluate(step, {"loss": m["loss"], "t": round(time.time() - t0)})

SAVE = E.get("SAVE", "")
if SAVE:
  from mgpo_jax.models.qwen2_5_vl import checkpoint as ckpt_lib
  tok_dir = os.path.join(SAVE, "tokenizer"); tok.save_pretrained(tok_dir); cfg.image().save_pretrained(tok_dir)
  root = os.path.join(SAVE, "checkpoints")
  ckpt_lib.save_params(root, tr.params(), mcfg.to_hf_dict(), step=STEPS, assets_from=tok_dir)
  ckpt_lib.export_hf(root, os.path.join(SAVE, "hf"), overwrite=True)
