import dataclasses, sys, re, numpy as np, jax
from mgpo_jax.repro import gates, pretrain
from mgpo_jax.data import scenes
from mgpo_jax.models.qwen2_5_vl import params as params_lib, tokenizer as tok_lib
from mgpo_jax import sampling
from mgpo_jax.rollout import engine as engine_lib, parse as parse_lib
hf = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 32
cfg = pretrain.PretrainConfig()
model = params_lib.from_pretrained(hf); tok = tok_lib.load_tokenizer(hf)
sampler = sampling.Sampler(model, gates.sampler_config(cfg), tok)
modes = engine_lib.RolloutMode
greedy = dict(temperature=0.0, max_new_tokens=64)
eng = {"refer": engine_lib.RolloutEngine(sampler, tok, dataclasses.replace(cfg.rollout(modes.SINGLE_TURN), prompts=pretrain.refer_prompts(cfg.prompt_style), **greedy)),
       "mgpo": engine_lib.RolloutEngine(sampler, tok, dataclasses.replace(cfg.rollout(modes.MGPO), **greedy))}
refer, qs, tg, objs = [], [], [], []
for s in range(2_000_000, 2_000_000 + n):
  img, objects, k, _ = pretrain._decoded(s, cfg); t = objects[k]
  refer.append({"id": f"r{s}", "question": pretrain.REFER_QUESTION.format(color=t.color), "choices": None, "answer": "A", "image": img})
  qs.append({"id": f"q{s}", "question": scenes.question(t.color), "choices": list(scenes.OPTIONS), "answer": "ABCD"[scenes.OPTIONS.index(t.dot)], "image": img})
  tg.append(t); objs.append(objects)
stats = {"refer": [0, 0, 0, 0, 0, 0], "mgpo": [0, 0, 0, 0, 0, 0]}  # colour right, entry box = that colour's box (iou>=.5), json iou target, json==entry
for name, samples in (("refer", refer), ("mgpo", qs)):
  trs = eng[name].run(samples, jax.random.key(0)).trajectories
  for i, (tr, t, objects) in enumerate(zip(trs, tg, objs)):
    text = tr.texts[0]
    m = re.match(r"The square: ([a-z]+)(\d{3}),(\d{3}),(\d{3}),(\d{3})", text)
    box = parse_lib.parse_bbox(text, 224, 224).box
    st = stats[name]
    if m:
      col = m.group(1); eb = tuple(int(m.group(j)) for j in range(2, 6))
      st[0] += col == t.color
      same = [o for o in objects if o.color == col]
      st[1] += bool(same) and gates.iou(eb, same[0].box_in) >= 0.5
      st[3] += box is not None and tuple(box) == eb
      if same:
        st[4] += abs(eb[0] - same[0].box_in[0]) <= 3; st[5] += abs(eb[1] - same[0].box_in[1]) <= 3
    st[2] += box is not None and gates.iou(box, t.box_in) >= 0.5
    if i < 0:
      print(name, t.color, [ (o.color, o.box_in) for o in objects], repr(text[:80]))
for k, v in stats.items(): print(k, "colour=question", v[0]/n, "entry box on its colour", v[1]/n, "json on target", v[2]/n, "json==entry", v[3]/n, "x1 ok", v[4]/n, "y1 ok", v[5]/n)
