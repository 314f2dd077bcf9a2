"""Quick start on a laptop: a tiny random Qwen2.5-VL-shaped model on synthetic V*-like data.

Every part of the program runs (multi-turn rollouts, rewards, GRPO updates, evaluation,
checkpoints, metrics, the rollout visualisation) in a few minutes on 2 CPU cores. The tokenizer is
built locally and the dataset generated on first use, so nothing is downloaded. A random model
rarely writes a valid box or the right letter: rewards stay near chance; it shows the plumbing.

  python -m mgpo_jax.main --config=configs/cpu_tiny.py --workdir=/tmp/mgpo
"""

from mgpo_jax.configs import base


def get_config():
  c = base.get_config()

  c.model.size = "tiny"  # Sizes in base's model.tiny: hidden 64, 2 layers; vision depth 2, hidden 32.
  c.model.init = "random"
  c.model.hf_dir = ""
  c.model.tokenizer = "build_local"
  c.model.dtype = "float32"  # bfloat16 matmuls are emulated (slow) on CPU.
  c.model.remat = False

  c.data.source = "synthetic"
  c.data.path = ""
  c.data.synthetic.n = 64
  c.data.synthetic.image_size = (224, 448)
  c.data.synthetic.target_size = (8, 14)
  c.data.tfds_data_dir = ""  # <workdir>/tfds, built on first use.
  c.data.tfds_name = "synthetic_tiny"
  c.data.batch_size = 2

  # Images of at most 64 merged tokens (256 patches).
  c.image.min_pixels = 16 * 28 * 28
  c.image.max_pixels = 64 * 28 * 28

  c.rollout.num_generations = 4
  c.rollout.max_new_tokens = 24
  # Turn-1 prompts are ~520 tokens with the tiny tokenizer (the system prompt is most of them).
  c.rollout.prompt_buckets = (512, 640)
  c.rollout.seq_buckets = (1024, 1280)
  c.rollout.patch_buckets = (256, 512)

  c.rl.mini_batch_size = 1  # 2 updates per step, so the old/new policy ratio moves.
  c.rl.micro_batch_size = 1

  c.optim.learning_rate = 1e-4  # The paper's 1e-6 would not move a random toy in 4 steps.

  c.train.num_steps = 4
  c.train.eval_every = 2
  c.train.checkpoint_every = 2
  c.train.visualize_every = 2
  c.train.num_visualize = 2

  c.eval.source = "synthetic"
  c.eval.path = ""
  c.eval.synthetic.n = 8
  c.eval.synthetic.image_size = (224, 448)
  c.eval.synthetic.target_size = (8, 14)
  c.eval.num_samples = 4
  c.eval.batch_size = 4
  return c
