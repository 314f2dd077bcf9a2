"""Label-first refer probe: continue the committed base on refer rows (4 framed squares) with the
answer's label BEFORE its box (`label_first=1`) or after (`label_first=0`, the control), same steps,
seed and lr; then greedy refer IoU>=0.5 and 'box on some square' on 128 held-out scenes."""
import dataclasses, json, sys, collections
import jax
from mgpo_jax.repro import gates, pretrain
from mgpo_jax.models.qwen2_5_vl import params as params_lib, tokenizer as tok_lib
from mgpo_jax import sampling
from mgpo_jax.rollout import engine as engine_lib, parse as parse_lib

label_first, out, steps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
if label_first:
  def box_text(box, label):
    return f'```json\n[{{"label": "{label}", "bbox_2d": [{", ".join(str(int(v)) for v in box)}]}}]\n```'
  pretrain.box_text = box_text
cfg = dataclasses.replace(pretrain.PretrainConfig(), init_dir=pretrain.BASE_DIR, steps=steps, mix=(1.0, 0.0, 0.0),
                          learning_rate=1e-3, seed=11, eval_every=200)
print(json.dumps(pretrain.run(cfg, out)))
hf = out + "/hf"
model = params_lib.from_pretrained(hf); tok = tok_lib.load_tokenizer(hf)
eng = engine_lib.RolloutEngine(sampling.Sampler(model, gates.sampler_config(cfg), tok), tok, dataclasses.replace(
    cfg.rollout(engine_lib.RolloutMode.SINGLE_TURN), prompts=pretrain.refer_prompts(cfg.prompt_style),
    temperature=0.0, max_new_tokens=48))
seeds = pretrain._seeds(2_000_000, 128, 0)
hit = on = n = 0
for st in range(0, 128, 32):
  rows, tg = [], []
  for s in seeds[st:st + 32]:
    img, objects, k, rng = pretrain._decoded(s, cfg); t = objects[k]
    rows.append({"id": f"r{s}", "question": pretrain.REFER_QUESTION.format(color=t.color), "choices": None,
                 "answer": "A", "image": img}); tg.append((t, objects))
  for tr, (t, objs) in zip(eng.run(rows, jax.random.key(st)).trajectories, tg):
    box = parse_lib.parse_bbox(tr.texts[0], 224, 224).box
    n += 1; hit += box is not None and gates.iou(box, t.box_in) >= 0.5
    on += box is not None and max(gates.iou(box, o.box_in) for o in objs) >= 0.5
print(json.dumps({"label_first": label_first, "steps": steps, "refer_iou50": hit / n, "box_on_some_square": on / n,
                  "example": tr.texts[0]}))
