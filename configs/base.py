"""Every field of an MGPO experiment, with the paper's set-up as defaults.

The defaults reproduce the MGPO paper (see shared/docs/mgpo-protocol.md): Qwen2.5-VL-7B-Instruct,
MME-RealWorld for training, V* Bench for evaluation, 512 prompts x 8 samples per step, mini-batches
of 128 prompts, AdamW at a constant 1e-6, PPO clip 0.2, k3 KL at 0.01, entropy 0.001, two turns.

Other configs import this one and change only what differs; the returned ConfigDict is locked, so a
misspelt field in a derived config or on the command line fails at once (with a "did you mean").
Field choices are validated by `mgpo_jax.config_schema.validate`.

Run from the repository root (configs/ is found through the current directory):

  python -m mgpo_jax.main --config=configs/tpu_v5.py --workdir=... --config.rl.kl_coef=0.0
"""

import ml_collections
from ml_collections import config_dict

# Where the launch scripts put weights and data on every TPU worker (launch/README.md).
DATA_ROOT = "/data"


def _synthetic(n: int, seed: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      n=n, seed=seed, image_size=(1000, 2000), target_size=(14, 22), categories=("color", "shape"),
      num_choices=4, square=False, pattern_period=6, sorted_choices=False, colors=(), image_format="PNG"))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- model -----------------------------------------------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  # "from_hf" (sizes from <hf_dir>/config.json), a released size ("qwen2_5_vl_3b", "qwen2_5_vl_7b",
  # "qwen2_5_vl_32b", "qwen2_5_vl_72b"), or "tiny" (the explicit sizes in model.tiny).
  m.size = "from_hf"
  m.init = "hf"  # "hf": load <hf_dir>'s weights; "random": seeded random init (train.seed).
  m.hf_dir = f"{DATA_ROOT}/models/Qwen2.5-VL-7B-Instruct"  # A local folder (copied by launch/).
  # "hf_dir" (the checkpoint's own tokenizer), "build_local" (a small BPE trained locally with
  # Qwen's special tokens and chat template), or the path of a tokenizer folder.
  m.tokenizer = "hf_dir"
  m.tokenizer_vocab_size = 512  # BPE vocabulary of "build_local" (before the 14 special tokens).
  # Forward passes (sampling, log-probs, loss) run in `dtype` ("float32" or "bfloat16"); the
  # trained weights and AdamW moments are float32 either way: AdamW steps of ~lr = 1e-6 are far
  # below bfloat16's resolution (2^-8 relative) and would round away.
  m.dtype = "bfloat16"
  m.remat = True  # Recompute each decoder layer in the backward pass.
  # Sizes of size="tiny" (a Qwen2.5-VL-shaped toy); unused otherwise.
  m.tiny = ml_collections.ConfigDict(dict(
      vocab_size=640,
      hidden_size=64,
      intermediate_size=128,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      mrope_section=(2, 3, 3),  # Sums to head_dim / 2 = 8.
      rope_theta=1_000_000.0,
      tie_word_embeddings=False,
      vision_depth=2,
      vision_hidden_size=32,
      vision_intermediate_size=64,
      vision_num_heads=2,
      vision_window_size=112,
      vision_fullatt_block_indexes=(1,),
  ))

  # --- device mesh -----------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  # ('data', 'fsdp', 'tensor'); one entry may be -1 (= the remaining devices).
  c.mesh.shape = (1, -1, 1)
  # Rollouts are process-local: each host samples its own prompts on a mesh of its local devices
  # of this shape; () = (1, 1, all local devices), i.e. tensor-parallel over the host's chips.
  c.mesh.sampling_shape = ()
  # Sharding table of the sampler's weights: "sampling" (tensor-parallel only, no FSDP gathers
  # per decoded token) or "training" (the learner's table).
  c.mesh.sampling_rules = "sampling"

  # --- training data ---------------------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.source = "mme_realworld"  # mgpo_jax.data.readers.SourceKind.
  d.path = f"{DATA_ROOT}/mme_realworld/MME_RealWorld.json"  # JSONL file, JSON list or V* root.
  d.image_root = ""  # MME-RealWorld images; "" = the folder of `path`.
  # mgpo_jax.data.synthetic.SyntheticConfig's fields (n samples from `seed`).
  d.synthetic = _synthetic(n=1024, seed=0)
  d.tfds_data_dir = f"{DATA_ROOT}/tfds"  # Built ArrayRecord dataset; "" = <workdir>/tfds.
  d.tfds_name = "mme_realworld"  # Builder config name (one per source/paths).
  d.split = "train"
  d.batch_size = 512  # Prompts per step (global); each prompt is sampled num_generations times.
  d.shuffle_seed = 0
  d.num_epochs = config_dict.placeholder(int)  # None: repeat forever.
  d.max_image_pixels = 100_000_000  # Decompression-bomb guard on the image header.
  d.worker_count = 0  # Grain decode processes (0: in-process threads).
  d.read_threads = 2
  d.prefetch = 8

  # --- image preprocessing (original and crop alike) -------------------------------------------
  c.image = ml_collections.ConfigDict()
  c.image.min_pixels = 256 * 28 * 28  # 200,704: small crops are enlarged.
  c.image.max_pixels = 1280 * 28 * 28  # 1,003,520.

  # --- multi-turn rollout ----------------------------------------------------------------------
  c.rollout = r = ml_collections.ConfigDict()
  r.max_turns = 2  # Turn 1: box; turn 2: answer (3 at inference gave V* 77.2 in the paper).
  r.num_generations = 8  # n samples per prompt (the GRPO group).
  r.temperature = 1.0
  r.top_p = 1.0
  r.top_k = 0  # 0: off.
  r.max_new_tokens = 8192  # Per turn.
  # Static shapes (compiled once each). A prompt longer than the last prompt bucket is skipped.
  r.prompt_buckets = (1024, 2048, 4096, 8192)  # Turn-1 prompt tokens.
  r.seq_buckets = (4096, 8192, 16384, 32768)  # Whole conversation (KV cache size).
  r.patch_buckets = (2560, 5120, 7680, 10240)  # Vision patches of all images of a row.
  r.sampling_batch_size = 0  # Prompts decoded together (their n samples each); 0 = whole step.
  r.lenient_bbox = False  # Strict protocol parsing (ints, string label).
  r.single_turn = False  # True: the single-turn GRPO baseline (no grounding turn).
  r.prompt_style = "paper"  # mgpo_jax.rollout.prompts.PROMPT_STYLES: "paper" or "short" (terse texts).
  r.reward = "exact_match"  # mgpo_jax.rollout.reward.REWARD_FNS.
  # A turn cut at its JSON block or the token limit is closed with <|im_end|> by the host; keep
  # that token (with the model's log-prob of it) in the loss.
  r.train_on_forced_close = True
  r.host_workers = 8  # Threads for the host work between turns (parse, crop, preprocess).

  # --- RL objective ----------------------------------------------------------------------------
  c.rl = rl = ml_collections.ConfigDict()
  rl.advantage = "grpo"  # mgpo_jax.rl.ADVANTAGE_FNS.
  rl.adv_eps = 1e-6
  rl.clip_ratio_low = 0.2
  rl.clip_ratio_high = 0.2
  rl.clip_ratio_dual = config_dict.placeholder(float)  # None: no dual clip.
  rl.kl_coef = 0.01
  rl.kl_estimator = "k3"  # mgpo_jax.rl.KLEstimator.
  rl.entropy_coef = 0.001
  rl.aggregation = "token_mean"  # mgpo_jax.rl.Aggregation.
  rl.seq_sum_norm_len = config_dict.placeholder(int)  # For aggregation="seq_sum_norm".
  rl.log_ratio_clip = 20.0
  rl.logprob_chunk_size = 1024  # Sequence positions per chunk of the vocabulary projection.
  rl.mini_batch_size = 128  # Prompts per optimizer update (512 / 128 = 4 updates per step).
  rl.micro_batch_size = 16  # Prompts per gradient-accumulation micro step.
  rl.ppo_epochs = 1  # Passes over each step's rollouts.
  # Log-probs of the sampling policy: "recompute" (learner forward before the first update, as
  # verl) or "sampler" (the sampler's own log-probs; saves a forward pass).
  rl.old_logp = "recompute"

  # --- optimizer -------------------------------------------------------------------------------
  c.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"
  o.learning_rate = 1e-6
  # Schedule lengths count training steps (each has data.batch_size / rl.mini_batch_size updates).
  o.schedule = "constant"  # "constant" or "cosine" (decay after the warmup); both warm up linearly.
  o.warmup_steps = 0
  o.decay_steps = 0  # Length of the cosine decay; 0 = until train.num_steps.
  o.min_lr_ratio = 0.0  # Final lr of the cosine decay, as a fraction of learning_rate.
  o.weight_decay = 0.01
  o.grad_clip_norm = 1.0  # 0 = no clipping.
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8

  # --- training loop ---------------------------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 80
  t.seed = 0  # Model init (random) and sampling keys.
  t.log_every = 1
  t.eval_every = 10  # 0 = never.
  t.eval_at_end = True
  t.eval_at_start = False  # Also evaluate the initial policy (logged as step 0).
  t.checkpoint_every = 10  # 0 = only at the end.
  t.keep_checkpoints = 3
  t.async_checkpoint = True
  t.visualize_every = 10  # Visual log of a few rollouts every K steps; 0 = never.
  t.num_visualize = 4
  t.export_hf_at_end = False  # Write an HF checkpoint to <workdir>/hf_export at the end.

  # --- evaluation ------------------------------------------------------------------------------
  c.eval = e = ml_collections.ConfigDict()
  e.source = "vstar"  # mgpo_jax.data.readers.SourceKind.
  e.path = f"{DATA_ROOT}/vstar"
  e.image_root = ""
  e.synthetic = _synthetic(n=64, seed=1)
  e.num_samples = 0  # 0 = all.
  e.greedy = True
  e.batch_size = 64  # Prompts per evaluation batch.
  e.max_turns = config_dict.placeholder(int)  # None: rollout.max_turns.

  c.lock()
  return c
