import dataclasses, jax, numpy as np
from mgpo_jax.repro import gates, pretrain
from mgpo_jax.models.qwen2_5_vl import params as params_lib, tokenizer as tok_lib
from mgpo_jax import sampling
from mgpo_jax.rollout import engine as engine_lib
from mgpo_jax.data import scenes, schema
cfg = pretrain.PretrainConfig()
hf = "/work/main/mgpo_jax/repro/base"
model = params_lib.from_pretrained(hf); tok = tok_lib.load_tokenizer(hf)
sampler = sampling.Sampler(model, gates.sampler_config(cfg), tok)
eng = engine_lib.RolloutEngine(sampler, tok, dataclasses.replace(cfg.rollout(engine_lib.RolloutMode.MGPO), temperature=1.0, max_new_tokens=48))
seeds = pretrain._seeds(3_000_000, 64, 0)
qs = []
for s in seeds:
  img, objects, k, rng = pretrain._decoded(s, cfg); t = objects[k]
  qs.append({"id": f"q{s}", "question": scenes.question(t.color), "choices": list(scenes.OPTIONS), "answer": schema.letter(scenes.OPTIONS.index(t.dot)), "image": img, schema.TARGET_BOX: list(t.box)})
res = []
for rep in range(2):
  for tr in eng.run(qs, jax.random.key(rep)).trajectories:
    res.append((tr.target_hit or 0.0, tr.reward))
r = np.array(res)
hit = r[:,0] > 0.5
print("n", len(r), "hit rate", hit.mean(), "reward|hit", r[hit,1].mean(), "reward|miss", r[~hit,1].mean())
