"""MGPO vs single-turn GRPO vs a random-crop control, from the tiny pretrained base, on 2 CPU cores.

  python -m mgpo_jax.repro --config=configs/repro_scenes.py --workdir=/tmp/mgpo_repro

The task (mgpo_jax/data/scenes.py): a 448 px scene with a position-coded background and four
coloured squares, each with a small dot; "What color is the dot on the red square?", four options in a
fixed order. The model sees the scene at 224 x 224 (the dot 3 px, a tenth of a patch); a crop of the
square's box comes back 6x larger. The base (mgpo_jax/repro/base, made by `python -m
mgpo_jax.repro.pretrain`) can box a named square and read a dot from a close-up, and has never been
shown which square this question needs: its turn-1 box holds the asked square ~31% of the time (chance
25%; a short dose of grounded-conversation rows about another question carries over that far).

Three RL arms from that base, same budget and seeds: MGPO, GRPO (rollout.single_turn) and the control
(rollout.random_crop: the turn-1 box is replaced by a random square's before cropping). `repro.*`
(mgpo_jax/repro/config.py) holds the seeds and arms; the repro fills in model.hf_dir, the tokenizer and
each arm's rollout switches.
"""

from mgpo_jax.configs import base
from mgpo_jax import config as config_lib
from mgpo_jax.repro import config as repro_config


def _scenes(section, n: int, seed: int) -> None:
  section.source = "scenes"
  section.path = ""
  section.scenes.n, section.scenes.seed = n, seed


def get_config():
  c = base.get_config()

  m = c.model
  m.size = "from_hf"
  m.init = "hf"
  m.hf_dir = ""  # the repro sets it to repro.base_dir
  m.tokenizer = "hf_dir"
  m.dtype = "float32"
  m.remat = False

  _scenes(c.data, n=1024, seed=0)
  c.data.tfds_name = "repro_scenes"
  c.data.tfds_data_dir = ""  # the repro points every run at <workdir>/tfds
  c.data.batch_size = 8

  # Every scene and crop -> 224 x 224 (64 tokens), as in pretraining (PretrainConfig.image); the bounds
  # sit a little off 224^2 so that smart_resize's float arithmetic cannot round a side to 196 or 252.
  c.image.min_pixels = 220 * 220
  c.image.max_pixels = 230 * 230

  r = c.rollout
  r.num_generations = 8
  r.max_new_tokens = 64  # the named box ("The square: red056,084,092,120." then its JSON) is ~51 tokens
  r.prompt_style = "short"
  r.prompt_buckets = (128, 192)
  r.seq_buckets = (192, 384, 512, 640)  # 640: a long turn 1 plus a tall crop can pass 512
  # A square box's crop is 224 x 224 (256 patches); a box of another shape can give up to ~300.
  r.patch_buckets = (288, 640)

  c.rl.mini_batch_size = 4  # 2 updates per step
  c.rl.micro_batch_size = 4
  c.rl.kl_coef = 0.01

  # 1e-4: at 3e-4 the rollouts' noise moved the box more than the reward did (KL 0.16, target hit
  # 0.43 -> 0.55 in 30 steps against 0.43 -> 0.77 at 1e-4: bench/results/repro/rl_probes/).
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 3  # RL steps; Adam's first updates move every weight by ~lr, so ramp up

  t = c.train
  t.num_steps = 40
  t.eval_every = 10
  t.eval_at_start = True
  t.checkpoint_every = 40
  t.keep_checkpoints = 1
  t.visualize_every = 40
  t.num_visualize = 2

  _scenes(c.eval, n=96, seed=1)
  c.eval.num_samples = 0
  c.eval.batch_size = 32

  with c.unlocked():
    c.repro = config_lib.to_config_dict(repro_config.Repro())  # seeds, arms, base: mgpo_jax/repro/config.py
  c.lock()
  return c
