"""Tests for mgpo_jax/configs/*.py, mgpo_jax.config, the programs' --config and the launch/ scripts."""

import importlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from mgpo_jax import config as cs
from mgpo_jax.config import files as config_files
from mgpo_jax.programs import cli
from mgpo_jax import rl
from mgpo_jax.parallel import sharding
from mgpo_jax.data import readers
from mgpo_jax.models.qwen2_5_vl import params as params_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG_NAMES = ("base", "cpu_tiny", "tpu_v5", "tpu_v4")


def load(name):
  return importlib.import_module(f"mgpo_jax.configs.{name}").get_config()


def flat(config, prefix=""):
  out = {}
  for k, v in config.items():
    if hasattr(v, "items"):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def problems_of(config):
  with pytest.raises(cs.ConfigError) as e:
    cs.validate(config)
  return str(e.value)


# ------------------------------------------------------------------------------------------------
# The shipped configs.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_configs_load_and_validate(name):
  config = load(name)
  cs.validate(config)
  assert set(config.keys()) == set(cs.SECTIONS)


def test_base_holds_the_paper_hyper_parameters():
  c = load("base")
  # shared/docs/mgpo-protocol.md.
  assert (c.rollout.num_generations, c.rollout.max_turns) == (8, 2)
  assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (1.0, 1.0, 0)
  assert c.rollout.max_new_tokens == 8192 and c.rollout.prompt_buckets[-1] == 8192
  assert (c.rollout.lenient_bbox, c.rollout.single_turn, c.rollout.reward) == (False, False, "exact_match")
  assert (c.image.min_pixels, c.image.max_pixels) == (200_704, 1_003_520)
  assert (c.rl.advantage, c.rl.adv_eps) == ("grpo", 1e-6)
  assert (c.rl.clip_ratio_low, c.rl.clip_ratio_high) == (0.2, 0.2)
  assert (c.rl.kl_coef, c.rl.kl_estimator, c.rl.entropy_coef) == (0.01, "k3", 0.001)
  assert c.rl.aggregation == "token_mean" and c.rl.ppo_epochs == 1
  assert (c.data.batch_size, c.rl.mini_batch_size) == (512, 128)
  assert (c.optim.name, c.optim.learning_rate, c.optim.schedule) == ("adamw", 1e-6, "constant")
  assert (c.optim.weight_decay, c.optim.grad_clip_norm) == (0.01, 1.0)
  assert c.model.size == "from_hf" and "7B" in c.model.hf_dir
  assert c.eval.greedy


@pytest.mark.parametrize("name", ("tpu_v5", "tpu_v4"))
def test_tpu_configs_keep_the_paper_objective_and_differ_only_in_layout(name):
  base, tpu = flat(load("base")), flat(load(name))
  assert base.keys() == tpu.keys()
  changed = {k.split(".")[0] for k in base if base[k] != tpu[k]}
  assert changed <= {"mesh", "rollout", "rl", "data"}
  for k in base:
    if k.startswith(("rl.", "optim.", "image.", "model.", "train.", "eval.")) and not k.endswith(
        "micro_batch_size"):
      assert base[k] == tpu[k], k
  for k in ("rollout.num_generations", "rollout.max_new_tokens", "data.batch_size"):
    assert base[k] == tpu[k]


@pytest.mark.parametrize("name, devices, hosts", [("tpu_v5", 32, 8), ("tpu_v4", 16, 4)])
def test_tpu_meshes_fit_their_slices(name, devices, hosts):
  c = load(name)
  shape = cs.validate_runtime(c, num_devices=devices, process_count=hosts, check_paths=False)
  assert shape == tuple(c.mesh.shape)
  # 7B's head / mlp / vocab dims split over the tensor axis (no silent replication).
  m = cs.NAMED_SIZES["qwen2_5_vl_7b"]()
  t = shape[2]
  for dim in (m.num_heads, m.num_kv_heads, m.intermediate_size, m.vocab_size, m.vision.num_heads,
              m.vision.intermediate_size):
    assert dim % t == 0


def test_every_field_is_described_once():
  """The shipped configs hold exactly the described fields, and the checker reads every one of them."""
  described = flat(cs.defaults())
  for name in CONFIG_NAMES:
    assert flat(load(name)).keys() == described.keys(), name
  c = load("base")
  c.unlock()
  for field in described:  # each field, removed alone, is reported by its own name
    section, *rest = field.split(".")
    node = c[section]
    for part in rest[:-1]:
      node = node[part]
    value = node[rest[-1]]
    del node[rest[-1]]
    assert f"{field}: missing" in problems_of(c), field
    node[rest[-1]] = value


def test_the_repro_section_is_validated():
  from mgpo_jax.repro.config import Repro

  c = load("repro_scenes")
  c.model.hf_dir = "/some/base"  # the repro fills it in
  cs.validate(c, extra_sections={"repro": Repro})
  c.repro.gates_num = 0
  c.repro.methods = ("mgpo", "ppo")
  c.data.scenes.object_side = 20
  with pytest.raises(cs.ConfigError) as e:
    cs.validate(c, extra_sections={"repro": Repro})
  assert "repro.gates_num: must be >= 1, got 0" in str(e.value)
  assert "repro.methods: must name one or more of ['control', 'grpo', 'mgpo']" in str(e.value)
  assert "data.scenes.object_side: must be >= 29, got 20" in str(e.value)


def test_derived_configs_cannot_add_fields():
  c = load("base")
  with pytest.raises(AttributeError, match="kl_coeff"):
    c.rl.kl_coeff = 0.1  # A typo of kl_coef.
  with pytest.raises(TypeError):
    c.rl.kl_coef = "high"


def test_cpu_tiny_is_tiny():
  c = load("cpu_tiny")
  m = cs.model_config(c)
  assert m.hidden_size <= 128 and m.num_layers <= 2
  assert m.vision.depth <= 4 and m.vision.hidden_size <= 64 and m.vision.window_size == 112
  assert params_lib.num_params(m) < 2_000_000
  assert c.data.batch_size * c.rollout.num_generations <= 8
  assert c.rollout.max_new_tokens <= 64 and c.train.num_steps <= 8
  assert max(c.data.synthetic.image_size) <= 448 and c.image.max_pixels <= 64 * 28 * 28
  assert c.model.tokenizer == "build_local" and c.model.init == "random" and c.data.source == "synthetic"


def test_cpu_tiny_prompts_fit_its_buckets(tmp_path):
  """The tiny buckets hold real prompts of the locally built tokenizer at max_pixels."""
  from mgpo_jax.models.qwen2_5_vl import chat
  from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
  from mgpo_jax.rollout import prompts

  c = load("cpu_tiny")
  tok = tok_lib.build_tokenizer(tmp_path / "tok", vocab_size=c.model.tokenizer_vocab_size)
  assert len(tok) <= c.model.tiny.vocab_size
  assert len(tok) == c.model.tokenizer_vocab_size + cs.NUM_LOCAL_SPECIAL_TOKENS
  max_tokens = c.image.max_pixels // (28 * 28)
  pcfg = prompts.PromptConfig()
  longest = 0
  for s in itertools.islice(readers.read_source(c.data.source, **cs.reader_kwargs(c.data)), 16):
    turn1 = chat.render_chat(tok, prompts.turn1_messages(s["question"], s["choices"], pcfg),
                                add_generation_prompt=True, num_tokens_per_image=[max_tokens])
    assert len(turn1) <= c.rollout.prompt_buckets[-1]
    follow = prompts.followup_user_message(s["question"], s["choices"], (0, 0, 99, 99), True, pcfg)
    # The follow-up is rendered alone here, so it carries a default system message: an upper bound.
    turn2 = chat.render_chat(tok, [follow], add_generation_prompt=True,
                                num_tokens_per_image=[max_tokens])
    longest = max(longest, len(turn1) + len(turn2) + 2 * c.rollout.max_new_tokens)
  assert longest <= c.rollout.seq_buckets[-1]


# ------------------------------------------------------------------------------------------------
# Invalid configs.
# ------------------------------------------------------------------------------------------------


def _set(path, value):
  def mutate(c):
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return mutate


def _set_any(path, value):
  """_set past ConfigDict's own type check (a config built some other way can hold anything)."""
  def mutate(c):
    with c.ignore_type():
      _set(path, value)(c)
  return mutate


INVALID = [
    (_set("rl.advantage", "grp"), "rl.advantage", "unknown name 'grp'"),
    (_set("rollout.reward", "f1"), "rollout.reward", "exact_match"),
    (_set("rl.kl_estimator", "k2"), "rl.kl_estimator", "'k1', 'k3'"),
    (_set("rl.aggregation", "mean"), "rl.aggregation", "token_mean"),
    (_set("rl.old_logp", "cache"), "rl.old_logp", "recompute"),
    (_set("data.source", "coco"), "data.source", "mme_realworld"),
    (_set("model.size", "qwen2_5_vl_8b"), "model.size", "qwen2_5_vl_7b"),
    (_set("model.dtype", "fp8"), "model.dtype", "bfloat16"),
    (_set("optim.name", "lion"), "optim.name", "adamw"),
    (_set("optim.schedule", "step"), "optim.schedule", "cosine"),
    (_set("mesh.sampling_rules", "fsdp"), "mesh.sampling_rules", "sampling"),
    (_set("data.batch_size", 500), "data.batch_size", "500 is not a multiple of rl.mini_batch_size=128"),
    (_set("rl.micro_batch_size", 48), "rl.mini_batch_size", "128 is not a multiple of rl.micro_batch_size=48"),
    (_set("rollout.sampling_batch_size", 100), "data.batch_size", "rollout.sampling_batch_size=100"),
    (_set("rollout.max_turns", 0), "rollout.max_turns", ">= 1, got 0"),
    (_set("rollout.max_turns", 1), "rollout.max_turns", "MGPO needs >= 2"),
    (_set("rollout.top_k", 100), "rollout.top_k", "in [0, 64]"),
    (_set("rollout.host_workers", 0), "rollout.host_workers", ">= 1"),
    (_set("image.min_pixels", 2_000_000), "image.min_pixels", "> image.max_pixels"),
    (_set("rollout.prompt_buckets", (2048, 1024)), "rollout.prompt_buckets", "strictly increasing"),
    (_set("rollout.seq_buckets", ()), "rollout.seq_buckets", "at least one bucket"),
    (_set("rollout.seq_buckets", (4096, 16384)), "rollout.seq_buckets", "< 24576"),
    (_set("rollout.patch_buckets", (1024, 5120)), "rollout.patch_buckets", "< 10240 patches"),
    (_set("rollout.temperature", 0.0), "rollout.temperature", "> 0.0"),
    (_set("rollout.top_p", 1.5), "rollout.top_p", "in (0.0, 1.0]"),
    (_set("rollout.num_generations", 1), "rollout.num_generations", "advantage 0"),
    (_set("rl.clip_ratio_low", 1.0), "rl.clip_ratio_low", "[0.0, 1.0)"),
    (_set("rl.kl_coef", -0.1), "rl.kl_coef", ">= 0.0"),
    (_set("rl.clip_ratio_dual", 0.5), "rl.clip_ratio_dual", "> 1.0"),
    (_set("model.hf_dir", ""), "model.hf_dir", "model.init='hf'"),
    (_set("model.size", "tiny"), "model.init", "init='random'"),
    (_set("mesh.shape", (2, 2)), "mesh.shape", "one entry per mesh axis"),
    (_set("mesh.shape", (-1, -1, 1)), "mesh.shape", "at most one -1"),
    (_set("mesh.sampling_shape", (1, 0, 1)), "mesh.sampling_shape", "entries must be >= 1"),
    (_set("data.path", ""), "data.path", "'mme_realworld' reads its samples from a path"),
    (_set("eval.path", ""), "eval.path", "'vstar'"),
    (_set("train.num_steps", 0), "train.num_steps", ">= 1"),
    (_set("train.keep_checkpoints", 0), "train.keep_checkpoints", ">= 1"),
    (_set("train.num_visualize", 5000), "train.num_visualize", "4096 rollouts"),
    (_set("optim.warmup_steps", 100), "optim.warmup_steps", "train.num_steps=80"),
    (_set("optim.b2", 1.0), "optim.b2", "[0.0, 1.0)"),
    (_set("optim.learning_rate", 0.0), "optim.learning_rate", "> 0.0"),
    (_set("optim.min_lr_ratio", 2.0), "optim.min_lr_ratio", "in [0.0, 1.0]"),
    (_set("rl.logprob_chunk_size", 0), "rl.logprob_chunk_size", ">= 1"),
    (_set("data.num_epochs", 0), "data.num_epochs", ">= 1"),
    (_set_any("train.eval_at_start", 1), "train.eval_at_start", "True or False"),
    (_set_any("rollout.lenient_bbox", "no"), "rollout.lenient_bbox", "True or False"),
    (_set("data.synthetic.categories", (1, 2)), "data.synthetic.categories", "tuple of strings"),
]


@pytest.mark.parametrize("mutate, field, fragment", INVALID,
                         ids=[f"{f}-{i}" for i, (_, f, _) in enumerate(INVALID)])
def test_invalid_config_names_the_problem(mutate, field, fragment):
  c = load("base")
  mutate(c)
  message = problems_of(c)
  assert message.startswith("invalid config (1 problem)")
  line = message.splitlines()[1]
  assert line.startswith(f"  - {field}: ") and fragment in line, message


@pytest.mark.parametrize("mutate, field", [
    (_set("model.tiny.num_heads", 3), "hidden_size 64 not divisible by num_heads 3"),
    (_set("model.tiny.mrope_section", (2, 2, 2)), "mrope_section"),
    (_set("model.tiny.vision.window_size", 100), "window_size"),
    (_set("model.tiny.vocab_size", 300), "model.tiny.vocab_size: 300 < 526"),
    (_set("model.tiny.vision.out_hidden_size", 32), "model.tiny.vision.out_hidden_size: 32 != model.tiny.hidden_size=64"),
    (_set("data.synthetic.target_size", (8, 300)), "data.synthetic: target_size"),
])
def test_invalid_tiny_sizes(mutate, field):
  c = load("cpu_tiny")
  mutate(c)
  assert field in problems_of(c)


def test_every_problem_is_listed_at_once():
  c = load("base")
  c.rl.advantage = "nope"
  c.data.batch_size = 100
  c.image.min_pixels = 10**8
  c.rollout.max_turns = 0
  message = problems_of(c)
  assert message.startswith("invalid config (4 problems)")
  for field in ("rl.advantage", "data.batch_size", "image.min_pixels", "rollout.max_turns"):
    assert f"  - {field}: " in message


def test_cosine_needs_a_decay():
  c = load("base")
  c.optim.schedule = "cosine"
  c.optim.warmup_steps = c.train.num_steps
  assert "optim.decay_steps: the cosine decay after 80 warmup steps is empty" in problems_of(c)
  c.optim.decay_steps = 10
  cs.validate(c)


def test_single_turn_allows_one_turn():
  c = load("base")
  c.rollout.max_turns = 1
  problems_of(c)
  c.rollout.single_turn = True
  cs.validate(c)


def test_single_turn_needs_fewer_buckets():
  c = load("base")
  c.rollout.seq_buckets = (4096, 16384)  # 8192 + 1 x 8192 fits, 8192 + 2 x 8192 does not.
  c.rollout.patch_buckets = (5120,)
  problems_of(c)
  c.rollout.single_turn = True
  cs.validate(c)


def test_missing_section_and_field():
  c = load("base")
  c.unlock()
  del c["train"]
  assert "train: section missing" in problems_of(c)
  c = load("base")
  c.unlock()
  del c.rl["kl_coef"]
  assert "rl.kl_coef: missing" in problems_of(c)


# ------------------------------------------------------------------------------------------------
# Runtime checks and conversions.
# ------------------------------------------------------------------------------------------------


def test_validate_runtime():
  c = load("base")
  assert cs.validate_runtime(c, num_devices=8, process_count=2, check_paths=False) == (1, 8, 1)
  c.mesh.shape = (2, -1, 2)
  assert cs.validate_runtime(c, num_devices=8, process_count=1, check_paths=False) == (2, 2, 2)
  with pytest.raises(cs.ConfigError, match=r"mesh.shape: .*6 devices are not divisible by 4"):
    cs.validate_runtime(c, num_devices=6, process_count=1, check_paths=False)
  c.mesh.shape = (1, 4, 1)
  with pytest.raises(cs.ConfigError, match=r"needs 4 devices, have 8"):
    cs.validate_runtime(c, num_devices=8, process_count=1, check_paths=False)
  c.mesh.shape = (1, -1, 1)
  with pytest.raises(cs.ConfigError, match=r"data.batch_size: 512 prompts cannot be split evenly over 3"):
    cs.validate_runtime(c, num_devices=3, process_count=3, check_paths=False)
  c.rl.micro_batch_size = 1  # 8 rows over 16 data-parallel shards.
  with pytest.raises(cs.ConfigError, match=r"rl.micro_batch_size: 8 rows .* 16 data-parallel"):
    cs.validate_runtime(c, num_devices=16, process_count=1, check_paths=False)


def test_validate_runtime_checks_local_paths(tmp_path):
  c = load("base")
  c.model.hf_dir = str(tmp_path)
  with pytest.raises(cs.ConfigError, match="no config.json in"):
    cs.validate_runtime(c, num_devices=1, process_count=1)
  (tmp_path / "config.json").write_text("{}")
  cs.validate_runtime(c, num_devices=1, process_count=1)
  c.model.tokenizer = str(tmp_path / "nope")
  with pytest.raises(cs.ConfigError, match="model.tokenizer: .* is not a folder"):
    cs.validate_runtime(c, num_devices=1, process_count=1)


def test_conversions():
  c = load("base")
  c.model.size = "qwen2_5_vl_3b"
  assert cs.model_config(c) == cs.NAMED_SIZES["qwen2_5_vl_3b"]()
  assert cs.model_config(c, image_token_id=7).image_token_id == 7
  loss = cs.policy_loss_config(c)
  assert loss == rl.PolicyLossConfig()  # The paper's values are the loss's defaults too.
  img = cs.image_processor_config(c)
  assert (img.min_pixels, img.max_pixels, img.patch_size) == (200_704, 1_003_520, 14)
  assert cs.sharding_rules(c) is sharding.SAMPLING_RULES
  c.mesh.sampling_rules = "training"
  assert cs.sharding_rules(c) is sharding.RULES
  assert cs.reader_kwargs(c.data) == {"path": c.data.path, "image_root": None}
  assert cs.reader_kwargs(c.eval) == {"root": c.eval.path}


def test_learner_and_optimizer_settings():
  from mgpo_jax import learner as learner_lib

  c = load("base")
  learner = cs.learner_config(c)
  # Paper: 512 prompts x 8 = 4096 rows per step, 4 updates of 128 prompts; micro-batches of 16 prompts.
  assert learner.num_mini_batches == 4 and learner.micro_batch_size == 16 * 8
  assert learner.advantage_estimator == "grpo" and learner.advantage_eps == 1e-6
  assert learner.precision is learner_lib.Precision.BF16 and learner.remat
  assert learner.old_logp is learner_lib.OldLogpSource.RECOMPUTE
  assert learner.loss == rl.PolicyLossConfig() and learner.temperature == 1.0
  assert cs.learner_config(load("cpu_tiny")).precision is learner_lib.Precision.FLOAT32
  assert learner.optim == learner_lib.OptimConfig()  # The paper's AdamW: the learner's defaults.
  # Schedules count training steps in the config and optimizer updates in the learner.
  c.optim.schedule, c.optim.warmup_steps, c.optim.min_lr_ratio = "cosine", 5, 0.1
  o = cs.optim_config(c)
  assert (o.warmup_steps, o.total_steps) == (5 * 4, 80 * 4)
  lr = learner_lib.make_schedule(o)
  assert float(lr(20)) == pytest.approx(1e-6) and float(lr(320)) == pytest.approx(1e-7)
  c.optim.decay_steps = 10
  assert cs.optim_config(c).total_steps == (5 + 10) * 4
  c.optim.grad_clip_norm = 0.0
  assert cs.optim_config(c).grad_clip_norm is None
  # rl.ppo_epochs passes over each rollout batch: the learner runs them and the schedule counts them.
  assert learner.num_epochs == 1
  c.rl.ppo_epochs = 3
  assert cs.learner_config(c).num_epochs == 3 and cs.optim_config(c).warmup_steps == 5 * 4 * 3


def test_rollout_and_sampler_settings():
  from mgpo_jax.rollout import engine

  c = load("cpu_tiny")
  r = cs.rollout_config(c)
  assert r.mode is engine.RolloutMode.MGPO and r.num_turns == 2 and r.num_generations == 4
  assert (r.temperature, r.top_p, r.top_k, r.max_new_tokens) == (1.0, 1.0, 0, 24)
  assert (r.image.min_pixels, r.image.max_pixels) == (16 * 28 * 28, 64 * 28 * 28)
  assert r.reward == "exact_match" and not r.lenient_parse
  c.eval.max_turns = 3
  g = cs.rollout_config(c, greedy=True)
  assert (g.num_generations, g.temperature, g.max_turns) == (1, 0.0, 3)
  c.rollout.single_turn = True
  assert cs.rollout_config(c).num_turns == 1
  s = cs.sampler_config(c)
  assert s.prompt_buckets == (512, 640) and s.cache_buckets == (1024, 1280)
  assert s.patch_buckets == (256, 512) and s.new_token_buckets == (24,)
  assert s.share_prompts  # on by default; the switch reaches the sampler
  c.rollout.share_prompts = False
  assert not cs.sampler_config(c).share_prompts


def test_model_config_from_hf_dir(tmp_path):
  import json

  hf = cs.NAMED_SIZES["qwen2_5_vl_3b"]()
  (tmp_path / "config.json").write_text(json.dumps(hf.to_hf_dict()))
  c = load("base")
  c.model.hf_dir = str(tmp_path)
  assert cs.model_config(c) == hf


def test_synthetic_reader_kwargs_make_the_configured_samples():
  from PIL import Image
  import io

  c = load("cpu_tiny")
  samples = list(readers.read_source(c.data.source, **cs.reader_kwargs(c.eval)))
  assert len(samples) == c.eval.synthetic.n
  lo, hi = c.eval.synthetic.image_size
  for s in samples[:3]:
    w, h = Image.open(io.BytesIO(s["image"])).size
    assert lo <= w <= hi and lo <= h <= hi


# ------------------------------------------------------------------------------------------------
# Command-line overrides and --config (mgpo_jax.programs.cli).
# ------------------------------------------------------------------------------------------------


def _parse(args, name="cpu_tiny"):
  config = config_files.load_config_file(config_files.resolve_config_path(name))
  _, overrides = cli.split_overrides(["prog", *args])
  problems = cli.apply_overrides(config, overrides)
  if problems:
    raise cs.ConfigError("; ".join(problems))
  return config


def test_overrides_reach_every_kind_of_field():
  c = _parse(["--config.rollout.num_generations=8", "--config.mesh.shape=(2,2,1)",
              "--config.data.num_epochs=3", "--config.rl.clip_ratio_dual=3.0",
              "--config.model.tiny.num_layers=1", "--config.rollout.single_turn=true",
              "--config.optim.learning_rate=3e-5", "--config.rl.advantage=rloo",
              "--config.mesh.sampling_shape=(1,1,1)", "--config.eval.max_turns=3",
              "--config.model.tokenizer=/tok", "--config.data.synthetic.n", "12"])
  assert c.rollout.num_generations == 8
  assert c.mesh.shape == (2, 2, 1)
  assert c.data.num_epochs == 3 and c.rl.clip_ratio_dual == 3.0
  assert c.model.tiny.num_layers == 1 and c.rollout.single_turn is True
  assert c.optim.learning_rate == 3e-5 and c.rl.advantage == "rloo"
  assert c.mesh.sampling_shape == (1, 1, 1) and c.eval.max_turns == 3
  assert c.model.tokenizer == "/tok" and c.data.synthetic.n == 12
  cs.validate(c)
  assert cs.model_config(c).num_layers == 1


def test_override_of_an_unknown_field_fails_with_did_you_mean():
  with pytest.raises(cs.ConfigError, match="rl.kl_coeff: unknown field; did you mean rl.kl_coef"):
    _parse(["--config.rl.kl_coeff=0.1"])
  with pytest.raises(cs.ConfigError, match="rollout.num_generations: must be an integer, got 'eight'"):
    _parse(["--config.rollout.num_generations=eight"])


def test_configs_by_name_by_old_path_and_by_file(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # outside the repository
  packaged = config_files.resolve_config_path("tpu_v5")
  assert packaged == config_files.resolve_config_path("configs/tpu_v5.py")
  assert packaged.startswith(config_files.PACKAGED_DIR)
  assert set(CONFIG_NAMES) <= set(config_files.packaged_configs())
  mine = tmp_path / "mine.py"
  mine.write_text("from mgpo_jax.configs import cpu_tiny\n\ndef get_config():\n  c = cpu_tiny.get_config()\n"
                  "  c.rl.kl_coef = 0.5\n  return c\n")
  assert config_files.load_config_file(config_files.resolve_config_path(str(mine))).rl.kl_coef == 0.5
  with pytest.raises(cs.ConfigError, match="'nope' is neither a file nor a packaged config"):
    config_files.resolve_config_path("nope")
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  return 1 / 0\n")
  with pytest.raises(cs.ConfigError, match="broken.py: ZeroDivisionError"):
    config_files.load_config_file(str(broken))


_MAIN = """
from mgpo_jax import config as config_lib
from mgpo_jax.programs import cli

_CONFIG = cli.define_config_flag("cpu_tiny")

def main(argv):
  c = _CONFIG.load(config_lib.validate)
  print("n =", c.rollout.num_generations, "advantage =", c.rl.advantage)

cli.run(main, "prog")
"""


def _prog(tmp_path, *args, **env):
  prog = tmp_path / "prog.py"
  prog.write_text(_MAIN)
  return subprocess.run([sys.executable, str(prog), *args], cwd=tmp_path,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **env}, capture_output=True, text=True,
                        timeout=120)


def test_program_overrides_from_any_folder(tmp_path):
  for spec in ("tpu_v5", "configs/tpu_v5.py", os.path.join(REPO, "mgpo_jax", "configs", "tpu_v5.py")):
    ok = _prog(tmp_path, f"--config={spec}", "--config.rollout.num_generations=16", "--config.rl.advantage=rloo")
    assert ok.returncode == 0, ok.stderr
    assert "n = 16 advantage = rloo" in ok.stdout


def test_config_problems_are_one_line_each_all_at_once_without_knock_on(tmp_path):
  bad = _prog(tmp_path, "--config=tpu_v5", "--config.rl.kl_coeff=0.1", "--config.rl.advantage=ppo",
              "--config.data.batch_size=-3", "--config.rollout.single_turn=maybe")
  assert bad.returncode == 2
  assert bad.stderr.splitlines() == [
      "prog: error: invalid config (4 problems):",
      "  - rl.kl_coeff: unknown field; did you mean rl.kl_coef?",
      "  - rollout.single_turn: must be True or False, got 'maybe'",
      "  - data.batch_size: must be >= 1, got -3",
      "  - rl.advantage: unknown name 'ppo'; known: " + str(sorted(rl.ADVANTAGE_FNS)),
  ], bad.stderr
  missing = _prog(tmp_path, "--config=configs/nope.py")
  assert missing.returncode == 2 and len(missing.stderr.splitlines()) == 1
  assert missing.stderr.startswith("prog: error: --config: 'configs/nope.py' is neither a file nor a packaged "
                                   "config (packaged: base, cpu_tiny,")
  traced = _prog(tmp_path, "--config.rl.kl_coeff=0.1", MGPO_TRACEBACK="1")
  assert traced.returncode == 2 and "Traceback" in traced.stderr


# ------------------------------------------------------------------------------------------------
# launch/ scripts.
# ------------------------------------------------------------------------------------------------

LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith(".sh"))


def test_launch_scripts_parse():
  assert {"common.sh", "create_tpu.sh", "setup.sh", "data.sh", "run.sh", "logs.sh",
          "delete_tpu.sh"} <= set(SCRIPTS)
  for script in SCRIPTS:
    r = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True, text=True)
    assert r.returncode == 0, (script, r.stderr)
  if shutil.which("shellcheck"):  # Installed on the dev machines; bash -n above always runs.
    r = subprocess.run(["shellcheck", "-x", *SCRIPTS], cwd=LAUNCH, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


@pytest.fixture(scope="module")
def fake_gcloud():
  """A PATH whose gcloud fails loudly: the dry runs must never call it."""
  d = tempfile.mkdtemp()
  path = os.path.join(d, "gcloud")
  with open(path, "w") as f:
    f.write("#!/bin/sh\necho 'gcloud was called' >&2\nexit 99\n")
  os.chmod(path, 0o755)
  yield d
  shutil.rmtree(d)


def _dry(script, fake_gcloud, *args, **env):
  full_env = {"PATH": f"{fake_gcloud}:{os.environ['PATH']}", "HOME": os.environ.get("HOME", "/tmp"),
              "DRY_RUN": "1", "USER": "alice", **env}
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], env=full_env,
                        capture_output=True, text=True, timeout=60)


def test_launch_create_picks_the_runtime_per_generation(fake_gcloud):
  for acc, version in (("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                       ("v5p-64", "v2-alpha-tpuv5")):
    r = _dry("create_tpu.sh", fake_gcloud, PROJECT="proj", ZONE="z1", ACCELERATOR=acc)
    assert r.returncode == 0, r.stderr
    assert (f"gcloud compute tpus tpu-vm create mgpo-alice --zone=z1 --project=proj "
            f"--accelerator-type={acc} --version={version}") in r.stdout
  r = _dry("create_tpu.sh", fake_gcloud, PROJECT="proj", ACCELERATOR="v3-8")
  assert r.returncode != 0 and "unknown ACCELERATOR 'v3-8'" in r.stderr
  r = _dry("create_tpu.sh", fake_gcloud, PROJECT="proj", SPOT="1")
  assert "--spot" in r.stdout


def test_launch_run_starts_main_on_all_workers(fake_gcloud):
  r = _dry("run.sh", fake_gcloud, "--config.rl.kl_coef=0.0", "--config.data.path=/a b",
           PROJECT="proj", TPU_NAME="tpu1", WORKDIR="gs://bkt/runs/x", CONFIG="configs/tpu_v4.py")
  assert r.returncode == 0, r.stderr
  assert "tpu-vm ssh tpu1" in r.stdout and "--worker=all" in r.stdout
  assert ("-m mgpo_jax.main --config=configs/tpu_v4.py --workdir=gs://bkt/runs/x "
          "--config.rl.kl_coef=0.0 --config.data.path=/a\\\\ b") in r.stdout


@pytest.mark.parametrize("script, env, error", [
    ("run.sh", {}, "set PROJECT"),
    ("run.sh", {"PROJECT": "p"}, "set WORKDIR"),
    ("run.sh", {"PROJECT": "p", "WORKDIR": "gs://b/x", "CONFIG": "configs/nope.py"}, "CONFIG=configs/nope.py"),
    ("data.sh", {"PROJECT": "p"}, "set GCS_DATA"),
    ("data.sh", {"PROJECT": "p", "GCS_DATA": "/local"}, "must be a gs:// path"),
    ("data.sh", {"PROJECT": "p", "GCS_DATA": "gs://b/d", "DATA_MODE": "nfs"}, "DATA_MODE must be"),
    ("delete_tpu.sh", {}, "set PROJECT"),
])
def test_launch_scripts_fail_clearly(fake_gcloud, script, env, error):
  r = _dry(script, fake_gcloud, **env)
  assert r.returncode != 0
  assert error in r.stderr and "gcloud was called" not in r.stderr


def test_launch_other_scripts_dry_run(fake_gcloud):
  env = {"PROJECT": "p", "GCS_DATA": "gs://bkt/mgpo/data", "TPU_NAME": "t"}
  r = _dry("setup.sh", fake_gcloud, **env)
  assert r.returncode == 0, r.stderr
  assert "tpu-vm scp" in r.stdout and "pip install -q -e" in r.stdout and "--worker=all" in r.stdout
  r = _dry("data.sh", fake_gcloud, **env)
  assert "gcloud storage rsync --recursive gs://bkt/mgpo/data /data" in r.stdout
  r = _dry("data.sh", fake_gcloud, DATA_MODE="gcsfuse", **env)
  assert "--only-dir mgpo/data bkt /data" in r.stdout
  r = _dry("logs.sh", fake_gcloud, WORKER="3", FOLLOW="0", **env)
  assert "--worker=3" in r.stdout and "tail\\ -n\\ 100\\ \\ ~/mgpo_run.log" in r.stdout
  r = _dry("stop.sh", fake_gcloud, **env)
  assert "kill\\ -TERM" in r.stdout
  r = _dry("delete_tpu.sh", fake_gcloud, **env)
  assert "tpu-vm delete t --zone=us-east5-a --project=p --quiet" in r.stdout
