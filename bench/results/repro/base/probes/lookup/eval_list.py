"""Lookup accuracy of pretrain's list rows (their own prompt): true list vs the list with the squares'
boxes rotated by one (chance 1/2), teacher-forced NLL over held-out scenes. usage: eval_list.py HF N NEV"""
import dataclasses, sys, json, numpy as np, jax, jax.numpy as jnp
from mgpo_jax.repro import pretrain as P
from mgpo_jax.learner.step import sequence_logprobs, token_loss_mask
from mgpo_jax.models.qwen2_5_vl import params as params_lib, tokenizer as tok_lib
hf, N, NEV = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = dataclasses.replace(P.PretrainConfig(), scene=dataclasses.replace(P.PretrainConfig.scene, num_objects=N))
tok = tok_lib.load_tokenizer(hf); model = params_lib.from_pretrained(hf); mcfg = model.cfg
seeds = P._seeds(99, NEV, 5)
orig = P.list_text
def rotated(objs):
  bx = [o.box_in for o in objs]; bx = bx[1:] + bx[:1]
  return orig([dataclasses.replace(o, box_in=b) for o, b in zip(objs, bx)])
@jax.jit
def nll(b):
  lp, _ = sequence_logprobs(model, b, chunk_size=1024, temperature=1.0, compute_entropy=False)
  return -jnp.sum(lp * token_loss_mask(b), 1)
out = []
for fn in (orig, rotated):
  P.list_text = fn
  rows = P.build_rows(P.RowKind.LIST, seeds, tok, mcfg, cfg)
  out.append(np.asarray(nll(P.to_batch(rows, P.RowKind.LIST, mcfg, cfg, tok.pad_token_id))))
print(json.dumps({"hf": hf, "N": N, "n": NEV, "list_acc": float(np.mean(out[0] < out[1])), "true_nll": float(out[0].mean()), "rotated_nll": float(out[1].mean())}))
