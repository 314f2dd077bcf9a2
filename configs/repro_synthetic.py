"""MGPO vs single-turn GRPO on a synthetic "find the small detail" task, from scratch on 2 CPU cores.

  python -m mgpo_jax.repro --config=configs/repro_synthetic.py --workdir=/tmp/mgpo_repro

The task (mgpo_jax/data/synthetic.py, category "color"): a ~1000 px square image with faint pastel
clutter and one small (32-40 px) saturated object; the question asks for its colour (one of four,
always listed in the same order). The model sees the image at 224x224, where the object is a 7-9 px
dot; a crop of a third of the image comes back at 224x224 with the object 3x larger.

Per seed: a supervised warm-up of a from-scratch Qwen2.5-VL-shaped model (`mgpo_jax.train.sft`; never a
box label): a perception stage that answers from close-up crops only (so no answer is ever trained on
the shrunk full image), then the conversation format with RANDOM grid boxes and close-up reading. Then
MGPO (two turns) and GRPO (one turn) from the same warm-up with the same budget. `repro.*` (described in
mgpo_jax/repro/config.py) holds the warm-up and the comparison; the other sections are the RL runs' (the repro fills in model.hf_dir, the
tokenizer and rollout.single_turn).
"""

from configs import base
from mgpo_jax import config as config_lib
from mgpo_jax.repro import config as repro_config

def _synthetic(section, n: int, seed: int) -> None:
  s = section.synthetic
  s.n, s.seed = n, seed
  s.image_size = (896, 1120)
  s.target_size = (32, 40)
  s.categories = ("color",)
  s.square = True
  # Four colours, options always in the same order: the letter names the colour, so the tiny model
  # needs no in-context lookup of the option text (a skill a pretrained VLM brings; not studied here).
  s.colors = ("blue", "green", "red", "yellow")
  s.sorted_choices = True
  s.image_format = "JPEG"  # 40x faster to encode than PNG for these noisy images


def get_config():
  c = base.get_config()

  m = c.model
  m.size = "tiny"
  m.init = "random"
  m.hf_dir = ""
  m.tokenizer = "build_local"  # the repro trains one on the task's texts (see repro.task_corpus)
  m.tokenizer_vocab_size = 1024
  m.dtype = "float32"
  m.remat = False
  m.tiny.update(dict(
      vocab_size=1088,  # >= the tokenizer's 1024 + 14 special tokens
      hidden_size=128,
      intermediate_size=512,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      # head_dim 32. Where to look is read from the image tokens' rotary phases: the width section
      # takes the lowest frequencies, so it gets most pairs here (Qwen's 1e6 and (16, 24, 24) leave
      # an 8x8 token grid almost unrotated in width). Much lower theta (e.g. 20) scrambles every pair
      # over the ~300 tokens between the answer and the image, and the model never learns to read it.
      mrope_section=(1, 3, 12),
      rope_theta=1e3,
      tie_word_embeddings=False,
  ))
  m.tiny.vision.update(dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, window_size=112,
                            fullatt_block_indexes=(1,), out_hidden_size=128))

  c.data.source = "synthetic"
  c.data.path = ""
  _synthetic(c.data, n=512, seed=0)
  c.data.tfds_name = "repro_color"
  c.data.tfds_data_dir = ""  # the repro points every run at <workdir>/tfds
  c.data.batch_size = 8

  # Every square image and crop -> 224 x 224 (64 tokens); the bounds sit a little off 224^2 so that
  # smart_resize's float arithmetic cannot round a side to 196 or 252.
  c.image.min_pixels = 220 * 220
  c.image.max_pixels = 230 * 230

  r = c.rollout
  r.num_generations = 8
  r.max_new_tokens = 40  # the JSON box is ~27 tokens, the answer 5
  r.prompt_style = "short"
  r.prompt_buckets = (128, 192)
  r.seq_buckets = (192, 384, 512)  # train rows fit 384; the sampler cache needs up to ~470
  r.patch_buckets = (272, 544)  # >= what 2 images of max_pixels can give (validated)

  c.rl.mini_batch_size = 4  # 2 updates per step
  c.rl.micro_batch_size = 4
  # The reward never looks at the box, and a missed or invalid box still leaves the full image in the
  # context, so nothing but the KL holds the box format while hits are rare; at lr 3e-4 and KL 0.01 it
  # was lost within 20 steps on one seed of three.
  c.rl.kl_coef = 0.05

  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 10  # RL steps; Adam's first updates move every weight by ~lr, so ramp up

  t = c.train
  t.num_steps = 40
  t.eval_every = 10
  t.eval_at_start = True
  t.checkpoint_every = 20
  t.keep_checkpoints = 1
  t.visualize_every = 20
  t.num_visualize = 2

  c.eval.source = "synthetic"
  c.eval.path = ""
  _synthetic(c.eval, n=96, seed=1)
  c.eval.num_samples = 0
  c.eval.batch_size = 32

  with c.unlocked():
    c.repro = config_lib.to_config_dict(repro_config.Repro())  # seeds 0-2, the warm-up: mgpo_jax/repro/config.py
  c.lock()
  return c
