"""The paper's MGPO run (Qwen2.5-VL-7B, all of base's hyper-parameters) on a TPU v5p-64 slice.

v5p-64 = 32 chips (95 GiB HBM each) on 8 hosts. Mesh ('data', 'fsdp', 'tensor') = (1, 16, 2): the
learner shards the float32 weights and AdamW state 32 ways (FSDP x tensor, ~4 GiB a chip); each
host's sampler keeps a bfloat16 copy tensor-parallel over its 4 chips (~4 GiB a chip), leaving the
rest for KV caches. The TPU compiler puts the update program at 53 GiB a chip with full-resolution
images (`tools/plan.py --config=configs/tpu_v5.py --topology=v5p-64 --aot --aot_backend=tpu`,
bench/README.md). For another slice size change only the mesh, e.g. v5p-128:
--config.mesh.shape='(1,32,2)' (smaller slices: the plans in bench/README.md). Launch: launch/README.md.

  python -m mgpo_jax.main --config=configs/tpu_v5.py --workdir=gs://BUCKET/runs/mgpo_7b
"""

from mgpo_jax.configs import base


def get_config():
  c = base.get_config()
  c.mesh.shape = (1, 16, 2)
  # Per host (8 hosts x 64 prompts): 8 prompts x 8 samples = 64 conversations decoded together on
  # the host's 4 chips, whose bfloat16 KV cache at the largest seq bucket (32k tokens; 56 KiB a
  # token, 14 KiB a chip with the 4 KV heads split) is ~29 GiB a chip. Shorter rollouts use the
  # smaller cache buckets.
  c.rollout.sampling_batch_size = 8
  # 8 prompts = 64 rows = 4 rows per group per micro step; rematerialised layers keep one
  # [rows, T, 3584] bfloat16 activation per layer.
  c.rl.micro_batch_size = 8
  c.data.worker_count = 8  # MME-RealWorld images are large JPEGs; decode in parallel.
  return c
