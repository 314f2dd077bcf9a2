"""The paper's MGPO run (Qwen2.5-VL-7B, all of base's hyper-parameters) on a TPU v4-32 slice.

v4-32 = 16 chips (32 GiB HBM each) on 4 hosts. Mesh ('data', 'fsdp', 'tensor') = (1, 4, 4): the
learner shards the float32 weights and AdamW state 16 ways (~7.5 GiB a chip); the sampler keeps
bfloat16 weights tensor-parallel over each host's 4 chips (~3.8 GiB a chip). The 32 GiB of HBM is what sets the
smaller sampling and micro batches below (same results, more sequential work). For v4-64 use
--config.mesh.shape='(1,8,4)'. Launch: launch/README.md.

  python -m mgpo_jax.main --config=configs/tpu_v4.py --workdir=gs://BUCKET/runs/mgpo_7b_v4
"""

from mgpo_jax.configs import base


def get_config():
  c = base.get_config()
  c.mesh.shape = (1, 4, 4)
  # Per host (4 hosts x 128 prompts): 4 prompts x 8 samples = 32 conversations decoded together on
  # the host's 4 chips, whose KV cache at the largest seq bucket (32k tokens, 14 KiB a token a chip)
  # is ~15 GiB a chip.
  c.rollout.sampling_batch_size = 4
  c.rl.micro_batch_size = 2  # 16 rows = 4 rows per group per micro step.
  c.data.worker_count = 8
  return c
