"""Can a colour-keyed attention over the vision tokens find the named square? A bilinear probe:
score_t = x_t . W q_c (q_c a learned vector per colour, W learned), softmax over the 64 tokens of a scene;
loss = -log(attention mass on the tokens the named square's frame covers >= 15%). Fit on 3/4 of scenes.
usage: [NORM=rms] python attn_probe.py HF_DIR [num_scenes] [num_objects]
NORM=std (default) standardises each feature; NORM=rms divides each token by its RMS, as the LLM's RMSNorm does."""
import sys, dataclasses
import numpy as np, jax, jax.numpy as jnp, optax
from mgpo_jax.repro import pretrain as P
from mgpo_jax.data import scenes
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl.preprocess import preprocess_image
from mgpo_jax.models.qwen2_5_vl.vision import prepare_vision_inputs
hf = sys.argv[1]; n = int(sys.argv[2]) if len(sys.argv) > 2 else 240; N = int(sys.argv[3]) if len(sys.argv) > 3 else 4
cfg = P.PretrainConfig(); cfg = dataclasses.replace(cfg, scene=dataclasses.replace(cfg.scene, num_objects=N))
model = params_lib.from_pretrained(hf); vcfg = model.cfg.vision
cols = list(scenes.COLORS)
enc = jax.jit(lambda vis: model.visual(vis)) if hasattr(model, "visual") else jax.jit(lambda vis: model.vision(vis))
F, M, C, S = [], [], [], []   # feats [64,D], mask [64] of the named square, colour id
raw = []
for i, seed in enumerate(P._seeds(4242, n, 0)):
  img, objs, k, rng = P._decoded(seed, cfg)
  pv, grid = preprocess_image(img, cfg.image())
  feats = np.asarray(enc(prepare_vision_inputs(pv, grid, vcfg)))
  g = np.asarray(grid).reshape(-1, 3)[0]; H, W = int(g[1]) // 2, int(g[2]) // 2
  side = 224 / W; r = cfg.scene.ring
  a = np.asarray(img.resize((224, 224))).astype(np.float32) / 255.
  rawf = a.reshape(H, 28, W, 28, 3).mean((1, 3)).reshape(H * W, 3)
  for o in objs:
    m = np.zeros(H * W, np.float32)
    for t in range(H * W):
      ty, tx = divmod(t, W); x0, y0 = tx * side, ty * side
      a0, b0, a1, b1 = o.box_in
      outer = max(0, min(a1, x0 + side) - max(a0, x0)) * max(0, min(b1, y0 + side) - max(b0, y0))
      inner = max(0, min(a1 - r, x0 + side) - max(a0 + r, x0)) * max(0, min(b1 - r, y0 + side) - max(b0 + r, y0))
      m[t] = (outer - inner) / side ** 2 >= 0.15
    F.append(feats); raw.append(rawf); M.append(m); C.append(cols.index(o.color)); S.append(i)
F, raw, M, C, S = map(np.asarray, (F, raw, M, C, S))
import os
NORM = os.environ.get("NORM", "std")
def fit(X, name):
  if NORM == "std": X = (X - X.reshape(-1, X.shape[-1]).mean(0)) / (X.reshape(-1, X.shape[-1]).std(0) + 1e-6)
  else: X = X / np.sqrt((X ** 2).mean(-1, keepdims=True) + 1e-6)
  Xf = X.reshape(-1, X.shape[-1]); ev_, _ = np.linalg.eigh(np.cov(Xf.T)); print(name, "feature cov eigen top5 / median", ev_[-5:][::-1].round(3), np.median(ev_).round(5))
  tr, te = S < 3 * n // 4, S >= 3 * n // 4
  D = X.shape[-1]; key = jax.random.key(0)
  p = {"W": jax.random.normal(key, (D, 16)) * 0.1, "q": jax.random.normal(jax.random.key(1), (6, 16)) * 0.1}
  opt = optax.adam(1e-2); st = opt.init(p)
  def logits(p, X, C): return jnp.einsum("btd,dk,bk->bt", X, p["W"], p["q"][C])
  def loss(p, X, M, C):
    lp = jax.nn.log_softmax(logits(p, X, C), -1)
    return -jnp.mean(jax.nn.logsumexp(jnp.where(M > 0, lp, -1e9), -1))
  @jax.jit
  def step(p, st):
    g = jax.grad(loss)(p, X[tr], M[tr], C[tr]); u, st = opt.update(g, st); return optax.apply_updates(p, u), st
  def _ev(m):
    lg = np.asarray(logits(p, X[m], C[m])); top = lg.argmax(-1)
    hit = M[m][np.arange(len(top)), top] > 0
    mass = np.asarray(jnp.sum(jax.nn.softmax(lg, -1) * M[m], -1))
    return hit.mean(), mass.mean()
  ev = _ev
  for it in range(2000):
    p, st = step(p, st)
    if it in (50, 200, 500): print("  step", it, "test", ev(te), flush=True)
  print(f"{name}: train top1-in-square {ev(tr)[0]:.3f}, test top1 {ev(te)[0]:.3f}, test mass {ev(te)[1]:.3f}", flush=True)
print(hf, "scenes", n, "squares", N)
fit(F, "vision features (bilinear)")
fit(raw, "raw mean RGB of each token (bilinear)")
