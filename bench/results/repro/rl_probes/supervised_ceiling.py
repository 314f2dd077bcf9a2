"""Probe (not a recipe): how many SUPERVISED steps does the base need to box the asked square in MGPO's
turn 1? The format rows with the asked square boxed (j = k) instead of a random one: the RL question
with its box, which the base's recipe never shows. Only format rows. Measures the learning speed of the
mapping RL has to find, with a direct label instead of a 1-in-4 reward.
usage: python supervised_ceiling.py OUT STEPS LR
"""
import sys, dataclasses, json
from mgpo_jax.repro import pretrain as P

# A copy of the recipe module whose format rows box the asked square (k) rather than a random one (j).
src = open(P.__file__).read()
assert "j = int(rng.integers(len(objects)))" in src
code = src.replace("j = int(rng.integers(len(objects)))", "j = k")
mod = type(sys)("pretrain_asked"); mod.__file__ = P.__file__; sys.modules["pretrain_asked"] = mod
exec(compile(code, P.__file__, "exec"), mod.__dict__)
out, steps, lr = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cfg = dataclasses.replace(mod.PretrainConfig(), steps=steps, mix=(0.0, 0.0, 1.0, 0.0), learning_rate=lr,
                          init_dir="mgpo_jax/repro/base", named_boxes=True, eval_every=max(steps // 4, 1),
                          warmup_steps=min(20, steps - 1), seed=77)
print(json.dumps(mod.run(cfg, out), indent=1))
