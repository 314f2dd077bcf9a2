"""Is a square's colour linearly readable from the image tokens the LLM's keys see?

For each held-out 4-square scene: the vision tower's merged tokens (8x8, 28 px each in the 224 px view);
a token is labelled with a square's colour when that square's frame covers >= 15% of it. A softmax
classifier (6 colours) on the tokens' features, fit on 3/4 of the scenes, accuracy on the rest.
Features: the vision output (the LLM's layer-0 input) and, with LAYERS, the LLM residual at the image
positions after each decoder layer (what later layers' keys are made from).
usage: python colour_probe.py HF_DIR [num_scenes]
"""
import sys, dataclasses
import numpy as np, jax, jax.numpy as jnp, optax
from mgpo_jax.repro import pretrain as P
from mgpo_jax.data import scenes
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl.preprocess import preprocess_image
from mgpo_jax.models.qwen2_5_vl.vision import prepare_vision_inputs

hf = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 240
cfg = P.PretrainConfig(); model = params_lib.from_pretrained(hf); vcfg = model.cfg.vision
cols = list(scenes.COLORS)
enc = jax.jit(lambda vis: model.visual(vis)) if hasattr(model, "visual") else jax.jit(lambda vis: model.vision(vis))
X, Y, S = [], [], []
for i, seed in enumerate(P._seeds(4242, n, 0)):
  img, objs, k, rng = P._decoded(seed, cfg)
  pv, grid = preprocess_image(img, cfg.image())
  feats = np.asarray(enc(prepare_vision_inputs(pv, grid, vcfg)))  # [U, D] HF order
  gh, gw = int(grid[0][1]) // 2 if np.ndim(grid) > 1 else int(grid[1]) // 2, None
  g = np.asarray(grid).reshape(-1, 3)[0]; H, W = int(g[1]) // 2, int(g[2]) // 2
  side = 224 / W
  r = cfg.scene.ring
  for t in range(H * W):
    ty, tx = divmod(t, W); x0, y0 = tx * side, ty * side
    best, lab = 0.0, -1
    for o in objs:
      a0, b0, a1, b1 = o.box_in
      outer = max(0, min(a1, x0 + side) - max(a0, x0)) * max(0, min(b1, y0 + side) - max(b0, y0))
      inner = max(0, min(a1 - r, x0 + side) - max(a0 + r, x0)) * max(0, min(b1 - r, y0 + side) - max(b0 + r, y0))
      frac = (outer - inner) / side ** 2
      if frac > best: best, lab = frac, cols.index(o.color)
    if best >= 0.15:
      X.append(feats[t]); Y.append(lab); S.append(i)
X, Y, S = np.asarray(X, np.float32), np.asarray(Y), np.asarray(S)
X = (X - X.mean(0)) / (X.std(0) + 1e-6)
tr, te = S < 3 * n // 4, S >= 3 * n // 4
W_ = jnp.zeros((X.shape[1], 6)); b_ = jnp.zeros(6)
opt = optax.adam(1e-2); st = opt.init((W_, b_))
def loss(p, x, y): return optax.softmax_cross_entropy_with_integer_labels(x @ p[0] + p[1], y).mean() + 1e-4 * jnp.sum(p[0] ** 2)
@jax.jit
def step(p, st):
  g = jax.grad(loss)(p, X[tr], Y[tr]); u, st = opt.update(g, st); return optax.apply_updates(p, u), st
p = (W_, b_)
for _ in range(1500): p, st = step(p, st)
acc = lambda m: float(np.mean(np.argmax(X[m] @ np.asarray(p[0]) + np.asarray(p[1]), 1) == Y[m]))
print(f"{hf}: tokens {len(Y)} (train {tr.sum()}), linear colour accuracy train {acc(tr):.3f} test {acc(te):.3f} (chance {np.bincount(Y).max()/len(Y):.3f})")
