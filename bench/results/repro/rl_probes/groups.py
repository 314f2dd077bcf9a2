import dataclasses, sys, re, collections, numpy as np, jax
from mgpo_jax.repro import gates, pretrain
from mgpo_jax.data import scenes
from mgpo_jax.models.qwen2_5_vl import params as params_lib, tokenizer as tok_lib
from mgpo_jax import sampling
from mgpo_jax.rollout import engine as engine_lib
hf = sys.argv[1]; n = int(sys.argv[2]); G = 8
cfg = pretrain.PretrainConfig()
model = params_lib.from_pretrained(hf); tok = tok_lib.load_tokenizer(hf)
sampler = sampling.Sampler(model, gates.sampler_config(cfg), tok)
eng = engine_lib.RolloutEngine(sampler, tok, dataclasses.replace(cfg.rollout(engine_lib.RolloutMode.MGPO), temperature=1.0, max_new_tokens=64))
qs, tg = [], []
for s in range(2_000_000, 2_000_000 + n):
  img, objects, k, _ = pretrain._decoded(s, cfg); t = objects[k]
  for g in range(G):
    qs.append({"id": f"q{s}-{g}", "question": scenes.question(t.color), "choices": list(scenes.OPTIONS), "answer": "ABCD"[scenes.OPTIONS.index(t.dot)], "image": img})
  tg.append(t.color)
trs = eng.run(qs, jax.random.key(1)).trajectories
mixed = 0; hits = 0; ent = []
for i in range(n):
  cols = []
  for tr in trs[i*G:(i+1)*G]:
    m = re.match(r"The square: ([a-z]+)", tr.texts[0]); cols.append(m.group(1) if m else "?")
  h = sum(c == tg[i] for c in cols); hits += h; mixed += 0 < h < G
  c = collections.Counter(cols); p = np.array(list(c.values())) / G; ent.append(-(p*np.log(p)).sum())
  print(tg[i], dict(c))
print("hit", hits/(n*G), "groups with mixed hit", mixed/n, "mean colour entropy (nats, of 8 samples)", np.mean(ent))
