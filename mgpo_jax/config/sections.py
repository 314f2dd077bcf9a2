"""Every field of an MGPO experiment, stated once: its type, its range or known names, and its default.

The defaults are the MGPO paper's set-up (see shared/docs/mgpo-protocol.md): Qwen2.5-VL-7B-Instruct,
MME-RealWorld for training, V* Bench for evaluation, 512 prompts x 8 samples per step, mini-batches of
128 prompts, AdamW at a constant 1e-6, PPO clip 0.2, k3 KL at 0.01, entropy 0.001, two turns. Where the
data and weights live is `configs/base.py`'s (it starts from `defaults()`); every other config changes
only what differs. The checks of each field are generated from this description (`fields.py`), the
rules that relate fields are `check.py`'s.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Mapping

import ml_collections

from mgpo_jax import learner
from mgpo_jax import rl
from mgpo_jax import sampling
from mgpo_jax.config.fields import Checker, field, to_config_dict
from mgpo_jax.data import readers
from mgpo_jax.data import scenes
from mgpo_jax.data import synthetic
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from mgpo_jax.parallel import sharding
from mgpo_jax.rollout import prompts
from mgpo_jax.rollout import reward


class ModelInit(enum.StrEnum):
  HF = "hf"  # Weights from <model.hf_dir>.
  RANDOM = "random"  # Seeded random init (train.seed).


SIZE_FROM_HF = "from_hf"
SIZE_TINY = "tiny"
# Released sizes by name (model.size), besides SIZE_FROM_HF and SIZE_TINY.
NAMED_SIZES: dict[str, Callable[[], Qwen25VLConfig]] = {
    "qwen2_5_vl_3b": Qwen25VLConfig.qwen2_5_vl_3b,
    "qwen2_5_vl_7b": Qwen25VLConfig.qwen2_5_vl_7b,
    "qwen2_5_vl_32b": Qwen25VLConfig.qwen2_5_vl_32b,
    "qwen2_5_vl_72b": Qwen25VLConfig.qwen2_5_vl_72b,
}

TOKENIZER_FROM_HF_DIR = "hf_dir"
TOKENIZER_BUILD_LOCAL = "build_local"


class DType(enum.StrEnum):
  """model.dtype: the dtype of forward passes (weights and optimizer state stay float32)."""

  FLOAT32 = "float32"
  BFLOAT16 = "bfloat16"


PRECISION: dict[DType, learner.Precision] = {
    DType.FLOAT32: learner.Precision.FLOAT32,
    DType.BFLOAT16: learner.Precision.BF16,
}


class SamplingRules(enum.StrEnum):
  SAMPLING = "sampling"
  TRAINING = "training"


SHARDING_RULES: dict[SamplingRules, Mapping[str, str | None]] = {
    SamplingRules.SAMPLING: sharding.SAMPLING_RULES,
    SamplingRules.TRAINING: sharding.RULES,
}


class Optimizer(enum.StrEnum):
  ADAMW = "adamw"  # mgpo_jax.learner.make_optimizer: global-norm clipping + AdamW.


def _mesh_shape(allow_empty: bool = False):
  def check(chk: Checker, path: str, shape: tuple[int, ...]) -> None:
    if allow_empty and shape == ():
      return
    if len(shape) != len(sharding.MESH_AXES):
      chk.add(path, f"must have one entry per mesh axis {sharding.MESH_AXES}, got {shape}")
    elif any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
      chk.add(path, f"entries must be >= 1, with at most one -1 (= the rest), got {shape}")
  return check


def _buckets(chk: Checker, path: str, v: tuple[int, ...]) -> None:
  if not v:
    chk.add(path, "must list at least one bucket")
  elif v[0] < 1 or any(b <= a for a, b in zip(v, v[1:])):
    chk.add(path, f"must be positive and strictly increasing, got {v}")


# The "tiny" model: a Qwen2.5-VL-shaped toy (hidden 64, 2 layers; vision depth 2, hidden 32).
TINY = Qwen25VLConfig(
    vocab_size=640, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
    mrope_section=(2, 3, 3),  # Sums to head_dim / 2 = 8.
    rope_theta=1_000_000.0, tie_word_embeddings=False,
    vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, window_size=112,
                        fullatt_block_indexes=(1,), out_hidden_size=64))


@dataclasses.dataclass(frozen=True)
class Model:
  """The policy: its sizes, where its weights and tokenizer come from, and its compute dtype."""

  # "from_hf" (sizes from <hf_dir>/config.json), a released size ("qwen2_5_vl_3b", "qwen2_5_vl_7b",
  # "qwen2_5_vl_32b", "qwen2_5_vl_72b"), or "tiny" (the sizes in model.tiny).
  size: str = field(SIZE_FROM_HF, choices=lambda: [SIZE_FROM_HF, SIZE_TINY, *NAMED_SIZES])
  init: str = field(ModelInit.HF.value, choices=ModelInit)  # "hf": <hf_dir>'s weights; "random": seeded init.
  hf_dir: str = ""  # A local checkpoint folder (configs/base.py: where launch/ copies it).
  # "hf_dir" (the checkpoint's own tokenizer), "build_local" (a small BPE trained locally with
  # Qwen's special tokens and chat template), or the path of a tokenizer folder.
  tokenizer: str = TOKENIZER_FROM_HF_DIR
  tokenizer_vocab_size: int = field(512, lo=256)  # BPE vocabulary of "build_local" (before the 14 specials).
  # Forward passes (sampling, log-probs, loss) run in `dtype`; the trained weights and AdamW moments
  # are float32 either way: AdamW steps of ~lr = 1e-6 are far below bfloat16's resolution (2^-8
  # relative) and would round away.
  dtype: str = field(DType.BFLOAT16.value, choices=DType)
  remat: bool = True  # Recompute each decoder layer in the backward pass.
  tiny: Qwen25VLConfig = TINY  # The sizes of size="tiny" (Qwen25VLConfig's own fields); unused otherwise.


@dataclasses.dataclass(frozen=True)
class Mesh:
  """The device meshes of the learner and of each host's sampler."""

  # ('data', 'fsdp', 'tensor'); one entry may be -1 (= the remaining devices).
  shape: tuple[int, ...] = field((1, -1, 1), check=_mesh_shape())
  # Rollouts are process-local: each host samples its own prompts on a mesh of its local devices
  # of this shape; () = (1, 1, all local devices), i.e. tensor-parallel over the host's chips.
  sampling_shape: tuple[int, ...] = field((), check=_mesh_shape(allow_empty=True))
  # Sharding table of the sampler's weights: "sampling" (tensor-parallel only, no FSDP gathers
  # per decoded token) or "training" (the learner's table).
  sampling_rules: str = field(SamplingRules.SAMPLING.value, choices=SamplingRules)


@dataclasses.dataclass(frozen=True)
class Synthetic:
  """mgpo_jax.data.synthetic.SyntheticConfig's fields (n samples from `seed`)."""

  n: int = field(1024, lo=1)
  seed: int = field(0, lo=0)
  image_size: tuple[int, ...] = (1000, 2000)
  target_size: tuple[int, ...] = (14, 22)
  categories: tuple[str, ...] = ("color", "shape")
  num_choices: int = 4
  square: bool = False
  sorted_choices: bool = False
  colors: tuple[str, ...] = ()
  image_format: str = field(synthetic.ImageFormat.PNG.value, choices=synthetic.ImageFormat)


def _path_prefix(chk: Checker, path: str, v: str) -> None:
  if v and "=" not in v:
    chk.add(path, f"{v!r} is not 'OLD=NEW'")


@dataclasses.dataclass(frozen=True)
class Scenes:
  """mgpo_jax.data.scenes.SceneConfig's fields (n scene questions from `seed`): the laptop-scale task."""

  n: int = field(1024, lo=1)
  seed: int = field(0, lo=0)
  input_side: int = field(scenes.SceneConfig.input_side, lo=28)
  scale: int = field(scenes.SceneConfig.scale, lo=1)
  num_objects: int = field(scenes.SceneConfig.num_objects, lo=2, hi=len(scenes.COLORS))
  object_side: int = field(scenes.SceneConfig.object_side, lo=29)
  dot_side: int = field(scenes.SceneConfig.dot_side, lo=1)
  lattice: int = field(scenes.SceneConfig.lattice, lo=1)
  jitter: int = field(scenes.SceneConfig.jitter, lo=0)
  ring: int = field(scenes.SceneConfig.ring, lo=0)  # a square's frame width (0: solid)


@dataclasses.dataclass(frozen=True)
class Data:
  """The training data."""

  # "mme_realworld" (the released JSON + images, or the lmms-eval parquet), "mgpo_parquet" (the MGPO
  # authors' split), "vstar", "hrbench", "jsonl", "synthetic" (formats: mgpo_jax/data/benchmarks.py).
  source: str = field(readers.SourceKind.MME_REALWORLD.value, choices=readers.SourceKind)
  path: str = ""  # The source's file or folder.
  image_root: str = ""  # MME-RealWorld JSON images; "" = the folder of `path`.
  # mgpo_parquet: "OLD=NEW" reads the file image_path with its leading OLD replaced by NEW (the authors'
  # full-resolution images); "" = the image embedded in the parquet.
  path_prefix: str = field("", check=_path_prefix)
  synthetic: Synthetic = Synthetic(n=1024, seed=0)
  scenes: Scenes = Scenes(n=1024, seed=0)
  tfds_data_dir: str = ""  # Built ArrayRecord dataset; "" = <workdir>/tfds.
  tfds_name: str = "mme_realworld"  # Builder config name (one per source/paths).
  split: str = "train"
  batch_size: int = field(512, lo=1)  # Prompts per step (global); each is sampled num_generations times.
  shuffle_seed: int = field(0, lo=0)
  num_epochs: int | None = field(None, lo=1)  # None: repeat forever.
  max_image_pixels: int = field(100_000_000, lo=1)  # Decompression-bomb guard on the image header.
  worker_count: int = field(0, lo=0)  # Grain decode processes (0: in-process threads).
  read_threads: int = field(2, lo=0)
  prefetch: int = field(8, lo=0)


@dataclasses.dataclass(frozen=True)
class Image:
  """Image preprocessing (original and crop alike)."""

  min_pixels: int = field(256 * 28 * 28, lo=1)  # 200,704: small crops are enlarged.
  max_pixels: int = field(1280 * 28 * 28, lo=1)  # 1,003,520.


@dataclasses.dataclass(frozen=True)
class Rollout:
  """The multi-turn rollout and its sampler's static shapes."""

  max_turns: int = field(2, lo=1)  # Turn 1: box; turn 2: answer (3 at inference gave V* 77.2 in the paper).
  num_generations: int = field(8, lo=1)  # n samples per prompt (the GRPO group).
  temperature: float = field(1.0, lo=0.0, lo_open=True)
  top_p: float = field(1.0, lo=0.0, hi=1.0, lo_open=True)
  top_k: int = field(0, lo=0, hi=sampling.SamplerConfig.max_top_k)  # 0: off.
  max_new_tokens: int = field(8192, lo=1)  # Per turn.
  # Static shapes (compiled once each). A prompt longer than the last prompt bucket is skipped.
  prompt_buckets: tuple[int, ...] = field((1024, 2048, 4096, 8192), check=_buckets)  # Turn-1 prompt tokens.
  seq_buckets: tuple[int, ...] = field((4096, 8192, 16384, 32768), check=_buckets)  # Whole conversation.
  patch_buckets: tuple[int, ...] = field((2560, 5120, 7680, 10240), check=_buckets)  # Patches of a row.
  sampling_batch_size: int = field(0, lo=0)  # Prompts decoded together (their n samples each); 0 = all.
  lenient_bbox: bool = False  # Strict protocol parsing (ints, string label).
  single_turn: bool = False  # True: the single-turn GRPO baseline (no grounding turn).
  # True: the random-crop control. A valid turn-1 box is replaced, before cropping, by the box of a
  # random object of the sample (its object_boxes) or, without them, of a random 3x3 grid cell; the
  # conversation, masks and loss are otherwise MGPO's. MGPO minus this is what grounding earns.
  random_crop: bool = False
  prompt_style: str = field("paper", choices=prompts.PROMPT_STYLES)  # "paper" or "short" (terse texts).
  reward: str = field("exact_match", choices=reward.REWARD_FNS)
  # A turn cut at its JSON block or the token limit is closed with <|im_end|> by the host; keep
  # that token (with the model's log-prob of it) in the loss.
  train_on_forced_close: bool = True
  host_workers: int = field(8, lo=1)  # Threads for the host work between turns (parse, crop, preprocess).
  # Prefill and vision-encode each prompt once for its num_generations rows, which then decode from
  # copies of its KV cache (same samples as without; False for A/B and debugging).
  share_prompts: bool = True


@dataclasses.dataclass(frozen=True)
class RL:
  """The RL objective and how a step's rollouts are split into updates."""

  advantage: str = field("grpo", choices=lambda: rl.ADVANTAGE_FNS)
  adv_eps: float = field(1e-6, lo=0.0, lo_open=True)
  clip_ratio_low: float = field(0.2, lo=0.0, hi=1.0, hi_open=True)
  clip_ratio_high: float = field(0.2, lo=0.0)
  clip_ratio_dual: float | None = field(None, lo=1.0, lo_open=True)  # None: no dual clip.
  kl_coef: float = field(0.01, lo=0.0)
  kl_estimator: str = field(rl.KLEstimator.K3.value, choices=rl.KLEstimator)
  entropy_coef: float = field(0.001, lo=0.0)
  aggregation: str = field(rl.Aggregation.TOKEN_MEAN.value, choices=rl.Aggregation)
  seq_sum_norm_len: int | None = field(None, lo=1)  # For aggregation="seq_sum_norm".
  log_ratio_clip: float = field(20.0, lo=0.0, lo_open=True)
  logprob_chunk_size: int = field(1024, lo=1)  # Sequence positions per chunk of the vocabulary projection.
  mini_batch_size: int = field(128, lo=1)  # Prompts per optimizer update (512 / 128 = 4 updates per step).
  micro_batch_size: int = field(16, lo=1)  # Prompts per gradient-accumulation micro step.
  ppo_epochs: int = field(1, lo=1)  # Passes over each step's rollouts.
  # Log-probs of the sampling policy: "recompute" (learner forward before the first update, as
  # verl) or "sampler" (the sampler's own log-probs; saves a forward pass).
  old_logp: str = field(learner.OldLogpSource.RECOMPUTE.value, choices=learner.OldLogpSource)
  # The learner encodes each prompt (and its image) once for the rows of its group on a device; False gives
  # every row its own copy (same numbers, same program; for A/B and debugging).
  share_prefix: bool = True


@dataclasses.dataclass(frozen=True)
class Optim:
  """Schedule lengths count training steps (each has data.batch_size / rl.mini_batch_size updates)."""

  name: str = field(Optimizer.ADAMW.value, choices=Optimizer)
  learning_rate: float = field(1e-6, lo=0.0, lo_open=True)
  # "constant" or "cosine" (decay after the warmup); both warm up linearly.
  schedule: str = field(learner.Schedule.CONSTANT.value, choices=learner.Schedule)
  warmup_steps: int = field(0, lo=0)
  decay_steps: int = field(0, lo=0)  # Length of the cosine decay; 0 = until train.num_steps.
  min_lr_ratio: float = field(0.0, lo=0.0, hi=1.0)  # Final lr of the cosine decay, as a fraction of lr.
  weight_decay: float = field(0.01, lo=0.0)
  grad_clip_norm: float = field(1.0, lo=0.0)  # 0 = no clipping.
  b1: float = field(0.9, lo=0.0, hi=1.0, hi_open=True)
  b2: float = field(0.999, lo=0.0, hi=1.0, hi_open=True)
  eps: float = field(1e-8, lo=0.0, lo_open=True)


@dataclasses.dataclass(frozen=True)
class Train:
  """The training loop."""

  num_steps: int = field(80, lo=1)
  seed: int = field(0, lo=0)  # Model init (random) and sampling keys.
  log_every: int = field(1, lo=1)
  eval_every: int = field(10, lo=0)  # 0 = never.
  eval_at_end: bool = True
  eval_at_start: bool = False  # Also evaluate the initial policy (logged as step 0).
  checkpoint_every: int = field(10, lo=0)  # 0 = only at the end.
  keep_checkpoints: int = field(3, lo=1)
  async_checkpoint: bool = True
  visualize_every: int = field(10, lo=0)  # Visual log of a few rollouts every K steps; 0 = never.
  num_visualize: int = field(4, lo=0)
  export_hf_at_end: bool = False  # Write an HF checkpoint to <workdir>/hf_export at the end.


@dataclasses.dataclass(frozen=True)
class Eval:
  """The evaluation set and protocol (greedy, multi-turn)."""

  source: str = field(readers.SourceKind.VSTAR.value, choices=readers.SourceKind)  # As data.source.
  path: str = ""
  image_root: str = ""
  path_prefix: str = field("", check=_path_prefix)
  synthetic: Synthetic = Synthetic(n=64, seed=1)
  scenes: Scenes = Scenes(n=96, seed=1)
  num_samples: int = field(0, lo=0)  # 0 = all.
  greedy: bool = True
  batch_size: int = field(64, lo=1)  # Prompts per evaluation batch.
  max_turns: int | None = field(None, lo=1)  # None: rollout.max_turns.


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Every section of an experiment config."""

  model: Model = Model()
  mesh: Mesh = Mesh()
  data: Data = Data()
  image: Image = Image()
  rollout: Rollout = Rollout()
  rl: RL = RL()
  optim: Optim = Optim()
  train: Train = Train()
  eval: Eval = Eval()


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Experiment))


def defaults() -> ml_collections.ConfigDict:
  """The ConfigDict of every field at its default (unlocked: the caller locks it)."""
  return to_config_dict(Experiment())
