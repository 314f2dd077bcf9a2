"""Every field of an MGPO experiment, with the paper's set-up as defaults.

The fields, their types, ranges and defaults (the MGPO paper's: Qwen2.5-VL-7B-Instruct, MME-RealWorld
for training, V* Bench for evaluation, 512 prompts x 8 samples per step, AdamW at a constant 1e-6, PPO
clip 0.2, k3 KL at 0.01, two turns) are described once, in `mgpo_jax/config/sections.py`; this file adds
where the launch scripts put the weights and data on every TPU worker (launch/README.md).

Other configs import this one and change only what differs; the returned ConfigDict is locked, so a
misspelt field in a derived config or on the command line fails at once (with a "did you mean").
Field values are validated by `mgpo_jax.config.validate`.

Run from the repository root (configs/ is found through the current directory):

  python -m mgpo_jax.main --config=configs/tpu_v5.py --workdir=... --config.rl.kl_coef=0.0
"""

import ml_collections

from mgpo_jax import config as config_lib

# Where the launch scripts put weights and data on every TPU worker (launch/README.md).
DATA_ROOT = "/data"


def get_config() -> ml_collections.ConfigDict:
  c = config_lib.defaults()
  c.model.hf_dir = f"{DATA_ROOT}/models/Qwen2.5-VL-7B-Instruct"
  c.data.path = f"{DATA_ROOT}/mme_realworld/MME_RealWorld.json"
  c.data.tfds_data_dir = f"{DATA_ROOT}/tfds"
  c.eval.path = f"{DATA_ROOT}/vstar"
  c.lock()
  return c
