import dataclasses, collections, json, jax
from mgpo_jax.repro import gates, pretrain
from mgpo_jax.models.qwen2_5_vl import params as params_lib, tokenizer as tok_lib
from mgpo_jax import sampling
from mgpo_jax.rollout import engine as engine_lib, parse as parse_lib
cfg = pretrain.PretrainConfig(); hf = "/work/main/mgpo_jax/repro/base"
model = params_lib.from_pretrained(hf); tok = tok_lib.load_tokenizer(hf)
eng = engine_lib.RolloutEngine(sampling.Sampler(model, gates.sampler_config(cfg), tok), tok, dataclasses.replace(cfg.rollout(engine_lib.RolloutMode.SINGLE_TURN), prompts=pretrain.refer_prompts(cfg.prompt_style), temperature=0.0, max_new_tokens=48))
seeds = pretrain._seeds(2_000_000, 128, 0)
hit, on_square, n = collections.Counter(), collections.Counter(), collections.Counter()
for st in range(0, 128, 32):
  rows, tg = [], []
  for s in seeds[st:st+32]:
    img, objects, k, rng = pretrain._decoded(s, cfg); t = objects[k]
    rows.append({"id": f"r{s}", "question": pretrain.REFER_QUESTION.format(color=t.color), "choices": None, "answer": "A", "image": img}); tg.append((t, objects))
  for tr, (t, objs) in zip(eng.run(rows, jax.random.key(st)).trajectories, tg):
    box = parse_lib.parse_bbox(tr.texts[0], 224, 224).box
    n[t.color] += 1
    hit[t.color] += box is not None and gates.iou(box, t.box_in) >= 0.5
    on_square[t.color] += box is not None and max(gates.iou(box, o.box_in) for o in objs) >= 0.5
out = {c: {"n": n[c], "refer_iou50": hit[c] / n[c], "box_on_some_square": on_square[c] / n[c]} for c in sorted(n)}
out["all"] = {"n": sum(n.values()), "refer_iou50": sum(hit.values()) / sum(n.values()), "box_on_some_square": sum(on_square.values()) / sum(n.values())}
print(json.dumps(out, indent=1))
