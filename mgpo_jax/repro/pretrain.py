"""The laptop-scale base: a tiny Qwen2.5-VL pretrained with labels on tasks other than the RL question.

Qwen2.5-VL comes to MGPO already able to box a named object and to read an enlarged region; the paper's
RL teaches it to box the region the *question* needs. The stand-in base learns, on `scenes`, with labels:

  refer      "Where is the red square?" -> its box as grounding JSON (`bbox_2d` in input pixels, the
             format the rollout parser reads): referring grounding, single turn
  close_up   the RL question on a close-up crop of the asked square (its box a few pixels off, or a
             smaller view of its dot: `close_up_box`): perception of the dot, single turn (the GRPO
             baseline's format)
  format     the MGPO conversation of the RL question whose turn-1 box is the box of a RANDOM square of
             the scene (uniform, whatever the question asks), trained; the answer is trained only when
             that square is the asked one. The format and the second look, never which square to pick
  list       "List the squares." -> "The squares: red056,084,092,120; green..." (`list_text`): every
             square, colours in a fixed order, each colour word directly followed by its box. The token
             after a colour word is its square's position, so attending from the colour word to the square
             of that colour is what lowers the loss at once (a first-order signal). Referring needs that
             lookup, and the refer rows alone never taught it: bench/results/repro/base/probes/lookup/
  grounded   referring grounding inside the MGPO conversation: the refer question ("Where is the red
             square?") under MGPO's system prompt and grounding request, turn 1 the named square's box
             (trained), turn 2 untrained. What a VLM brings from grounded-conversation data: the
             conversation's first turn boxes what the question names. Never the RL question.

With `named_boxes` (the committed base's last stages) a grounding answer (refer, and format's turn 1) first
names its square the list's way, then gives the JSON: "The square: red056,084,092,120.\n```json ...".
The box digits then follow the colour word, so the lookup the list rows teach is the one the box needs;
a bare JSON box must carry the colour from the question ~20 tokens on, which this model never learned.

So no row ever pairs the RL question with the box of the square it asks about: at RL step 0 the base
boxes the asked square in MGPO's turn 1 only as far as the grounded rows' habit carries over to a
question it never saw boxed (~1/3 of the time, chance 1/4), and only the answer reward can teach it to
box the asked one. Each step trains one kind (drawn by `mix`), so each kind keeps its own
short buckets. The committed base is a curriculum of such runs (`CURRICULUM`, `run_curriculum`): refer
rows on one square, then two, then four, then all three kinds on four squares, then list rows, then all
four kinds with named boxes, then a short dose of grounded rows and a stage that restores the refer box. Held-out teacher-forced
NLLs are logged every `eval_every` steps (the refer box against ln(#lattice cells), the image-blind
value), and the gates (`gates.py`) are measured at the end.

  python -m mgpo_jax.repro.pretrain --out=/tmp/tiny_base       # the recipe of mgpo_jax/repro/base/
  python -m mgpo_jax.repro.pretrain --nocurriculum --out=/tmp/stage --init_dir=/tmp/tiny_base/hf \
      --steps=500 --mix=1,0,0                                   # one more stage from it
  python -m mgpo_jax.repro.gates --hf_dir=/tmp/tiny_base/hf     # what it can do
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import app
from absl import flags
from flax import nnx

from mgpo_jax.data import scenes
from mgpo_jax.io import metrics as metrics_lib
from mgpo_jax.learner import optim
from mgpo_jax.learner import sft
from mgpo_jax.models.qwen2_5_vl import checkpoint as ckpt_lib
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
from mgpo_jax.models.qwen2_5_vl.chat import special_token_ids
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig
from mgpo_jax.rollout import engine as engine_lib
from mgpo_jax.rollout import prompts as prompts_lib
from mgpo_jax.rollout import trajectory as traj_lib
from mgpo_jax.sampling import SampleOutput, StopReason

logger = logging.getLogger(__name__)

# The committed base (HF safetensors, config, tokenizer, preprocessor), made by this module's recipe.
BASE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "base")

REFER_QUESTION = "Where is the {color} square?"
REFER_REQUEST = "Give its box as JSON."
LIST_QUESTION = "List the squares."
LIST_REQUEST = "Give each color and box."
BOX_LABEL = "key region"


class RowKind(enum.StrEnum):
  REFER = "refer"
  CLOSE_UP = "close_up"
  FORMAT = "format"
  LIST = "list"
  GROUNDED = "grounded"


# The kinds that are the MGPO conversation (two turns); the others are single-turn.
_TWO_TURNS = (RowKind.FORMAT, RowKind.GROUNDED)
# The grounding rows' requests (their prompt: `refer_prompts`); the other kinds use the RL prompt.
_REQUESTS = {RowKind.REFER: REFER_REQUEST, RowKind.LIST: LIST_REQUEST}


@dataclasses.dataclass(frozen=True)
class Bucket:
  seq: int
  patches: int


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  """The recipe. Model sizes: `model`; scenes: `scene`; the model's view: `image` (every scene and
  crop -> input_side x input_side)."""

  steps: int = 900
  batch_size: int = 32
  learning_rate: float = 2e-3
  warmup_steps: int = 50
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.01
  # Weights of the row kinds, in `RowKind` order: refer / close_up / format / list / grounded (missing last
  # weights are 0: the committed base's first stages predate the list and grounded rows).
  mix: tuple[float, ...] = (0.35, 0.35, 0.3)
  close_up_jitter: int = 6            # input px a close-up box is off its square (a model's box error)
  # Grounding answers (refer, format turn 1) name their square first: `grounding_text`.
  named_boxes: bool = False
  seed: int = 0
  eval_every: int = 100
  num_eval: int = 64
  vocab_size: int = 1024               # BPE merges; the model's vocab adds the special tokens
  # "" trains from a seeded init; an HF folder (a base made by this recipe) continues from its weights
  # and tokenizer, e.g. a second stage with another `mix`.
  init_dir: str = ""
  prompt_style: str = "short"
  scene: scenes.SceneConfig = scenes.SceneConfig()
  buckets: tuple[Bucket, ...] = (Bucket(192, 256), Bucket(192, 256), Bucket(384, 512), Bucket(192, 256),
                                 Bucket(384, 512))
  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 4                   # head_dim = hidden_size / num_heads = 2 * sum(mrope_section)
  # The width and height sections get most rotary pairs, at a low theta, so the image tokens' positions
  # stay distinct at the ~100-token distances of a turn.
  mrope_section: tuple[int, int, int] = (1, 3, 12)
  vision_hidden_size: int = 64
  vision_depth: int = 2

  def __post_init__(self):
    if len(self.buckets) != len(RowKind):
      raise ValueError(f"buckets: one per row kind ({', '.join(RowKind)}), got {len(self.buckets)}")
    kind_weights(self.mix)

  def image(self) -> ImageProcessorConfig:
    s = self.scene.input_side
    # A little off s^2 both ways, so that smart_resize's float rounding cannot move a side to s +- 28.
    return ImageProcessorConfig(min_pixels=(s - 4) ** 2, max_pixels=(s + 6) ** 2)

  def model(self, tokenizer) -> Qwen25VLConfig:
    sp = special_token_ids(tokenizer)
    h = self.hidden_size
    return Qwen25VLConfig(
        vocab_size=int(math.ceil(len(tokenizer) / 64) * 64), hidden_size=h, intermediate_size=4 * h,
        num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=max(1, self.num_heads // 2),
        mrope_section=self.mrope_section, rope_theta=1e3, tie_word_embeddings=False,
        image_token_id=sp.image_pad, video_token_id=sp.video_pad, vision_start_token_id=sp.vision_start,
        vision_end_token_id=sp.vision_end, bos_token_id=None, eos_token_id=sp.im_end, pad_token_id=sp.pad,
        vision=VisionConfig(depth=self.vision_depth, hidden_size=self.vision_hidden_size,
                            intermediate_size=2 * self.vision_hidden_size, num_heads=2, out_hidden_size=h,
                            window_size=112, fullatt_block_indexes=(self.vision_depth - 1,)))

  def rollout(self, mode: engine_lib.RolloutMode) -> engine_lib.RolloutConfig:
    return engine_lib.RolloutConfig(mode=mode, max_turns=1 if mode == engine_lib.RolloutMode.SINGLE_TURN else 2,
                                    num_generations=1, image=self.image(),
                                    prompts=prompts_lib.prompt_style(self.prompt_style))


def refer_prompts(style: str, request: str = REFER_REQUEST) -> prompts_lib.PromptConfig:
  """The single-turn prompt of the grounding rows: system, image, the question as is ("Where is the <colour>
  square?", "List the squares."), then `request`."""
  return dataclasses.replace(prompts_lib.prompt_style(style), question_template="{question}",
                             answer_format_open=request)


def task_corpus(cfg: PretrainConfig) -> list[str]:
  """The texts the base's tokenizer is trained on: every prompt, question, option and answer format."""
  p = prompts_lib.prompt_style(cfg.prompt_style)
  texts = [p.system_prompt, p.grounding_request, p.crop_intro_template, p.invalid_box_intro,
           p.answer_format_choices, p.single_turn_system_prompt, REFER_REQUEST, ", ".join(scenes.OPTIONS)]
  for c in scenes.COLORS:
    texts += [REFER_QUESTION.format(color=c), scenes.question(c)]
  texts += [answer_text(schema_letter) for schema_letter in "ABCD"]
  n = cfg.scene.object_side
  for x in range(0, cfg.scene.input_side - n + 1, 2):
    for label in (BOX_LABEL, *(f"{c} square" for c in scenes.COLORS)):
      texts.append(box_text((x, x // 2, x + n, x // 2 + n), label))
  return texts * 3  # BPE merges need repeated pairs


# ------------------------------------------------------------------------------------------------
# Texts of the protocol, and conversations through the rollout engine.
# ------------------------------------------------------------------------------------------------


def box_text(box: Sequence[int], label: str) -> str:
  """A grounding turn's output in the protocol's format."""
  return f'```json\n[{{"bbox_2d": [{", ".join(str(int(v)) for v in box)}], "label": "{label}"}}]\n```'


def entry_text(obj: scenes.SceneObject) -> str:
  """A square as its colour word directly followed by its box (input pixels, 3 digits each):
  "red056,084,092,120"."""
  return obj.color + ",".join(f"{int(v):03d}" for v in obj.box_in)


def list_text(objects: Sequence[scenes.SceneObject]) -> str:
  """Every square's `entry_text`, in the order of `scenes.COLORS`:
  "The squares: red056,084,092,120; green007,121,043,157."."""
  order = sorted(objects, key=lambda o: list(scenes.COLORS).index(o.color))
  return "The squares: " + "; ".join(entry_text(o) for o in order) + "."


def grounding_text(obj: scenes.SceneObject, label: str, named: bool) -> str:
  """A grounding answer: `box_text` of `obj`; with `named`, first the square's list entry on a line of its
  own ("The square: red056,084,092,120.\n```json ..."). The parser reads the fenced block after it. Why:
  the colour word directly followed by its box is the one-hop lookup the list rows teach; the bare JSON
  must carry the colour from the question to the box ~20 tokens on, which this model never learned."""
  box = box_text(obj.box_in, label)
  return f"The square: {entry_text(obj)}.\n{box}" if named else box


def answer_text(letter: str) -> str:
  return f"\\boxed{{{letter}}}"


class ScriptedSampler:
  """A `Sampler` stand-in for `RolloutEngine`: row r "samples" `script(r, turn)` then <|im_end|>, so
  labelled rows get exactly the tokens, images and masks of real rollouts."""

  def __init__(self, model_cfg, tokenizer, script: Callable[[int, int], str], pad_id: int, im_end_id: int):
    self.model_cfg, self.tokenizer, self.script = model_cfg, tokenizer, script
    self.pad_id, self.im_end_id = pad_id, im_end_id

  def _emit(self, rows: int, turn: int) -> SampleOutput:
    toks = [self.tokenizer.encode(self.script(r, turn), add_special_tokens=False) + [self.im_end_id]
            for r in range(rows)]
    n = max(len(t) for t in toks)
    tokens = np.full((rows, n), self.pad_id, np.int32)
    for r, t in enumerate(toks):
      tokens[r, :len(t)] = t
    return SampleOutput(tokens=tokens, logprobs=np.zeros((rows, n), np.float32),
                        lengths=np.asarray([len(t) for t in toks], np.int32),
                        stop_reasons=np.full((rows,), int(StopReason.EOS), np.int32),
                        close_logprobs=np.zeros((rows,), np.float32))

  def start(self, chunks, images, **kw):
    del images, kw
    return self._emit(len(chunks), 0), 1

  def extend(self, turn, chunks, images, **kw):
    del images, kw
    return self._emit(len(chunks), turn), turn + 1


# ------------------------------------------------------------------------------------------------
# Rows.
# ------------------------------------------------------------------------------------------------


def _decoded(seed: int, cfg: PretrainConfig):
  """A scene as a decoded sample of its RL question, plus its squares."""
  rng = np.random.default_rng(seed)
  img, objects = scenes.render_scene(rng, cfg.scene)
  k = int(rng.integers(len(objects)))
  return img, objects, k, rng


def close_up_box(obj: scenes.SceneObject, cfg: PretrainConfig, rng: np.random.Generator,
                 curriculum: bool = False) -> tuple[int, int, int, int]:
  """A square box (input pixels) on the square as a grounding box would give it: its box moved by up to
  `close_up_jitter` px each way. With `curriculum`, half the boxes are smaller, centred near the dot,
  from 2x the dot's side to the square's (log-uniform): a model trained from scratch first learns the
  dot's colour where it fills the view, then keeps it as the view widens (the dot alone in an
  RL-sized crop was still at chance after 300 steps; with these it left chance by step ~150)."""
  x1, y1, x2, y2 = obj.box_in
  n = x2 - x1
  jx, jy = (int(v) for v in rng.integers(-cfg.close_up_jitter, cfg.close_up_jitter + 1, size=2))
  if curriculum and rng.random() < 0.5:
    side = int(round(np.exp(rng.uniform(np.log(2 * cfg.scene.dot_side), np.log(n)))))
    f = side / n
    bx, by = round((x1 + x2 - side) / 2 + jx * f), round((y1 + y2 - side) / 2 + jy * f)
  else:
    side, bx, by = n, x1 + jx, y1 + jy
  hi = cfg.scene.input_side - side
  bx, by = min(max(bx, 0), hi), min(max(by, 0), hi)
  return bx, by, bx + side, by + side


def close_up_image(img, box_in, cfg: PretrainConfig):
  """The original's region under `box_in`, exactly (crop_original's float mapping can lose a pixel of a
  small box, and a 13 x 14 crop is resized to a 224 x 252 view)."""
  return img.crop(tuple(v * cfg.scene.scale for v in box_in))


def build_rows(kind: RowKind, seeds: Sequence[int], tokenizer, model_cfg: Qwen25VLConfig,
               cfg: PretrainConfig) -> list[traj_lib.Trajectory]:
  """One conversation per seed (a fresh scene each), as trajectories whose turn_mask is the loss mask."""
  samples, script_texts, train_answer = [], [], []
  for seed in seeds:
    img, objects, k, rng = _decoded(seed, cfg)
    target = objects[k]
    letter = "ABCD"[scenes.OPTIONS.index(target.dot)]
    if kind in (RowKind.REFER, RowKind.GROUNDED):
      # One referring question; GROUNDED asks it inside MGPO's conversation, whose turn 2 stays untrained:
      # "Where is ...?" has no answer to read from the crop.
      refer = kind == RowKind.REFER
      samples.append({"id": f"{kind}-{seed}", "question": REFER_QUESTION.format(color=target.color),
                      "choices": None, "answer": "A", "image": img})
      box = grounding_text(target, f"{target.color} square" if refer else BOX_LABEL, cfg.named_boxes)
      script_texts.append([box] if refer else [box, answer_text("A")])
      train_answer.append(refer)
      continue
    if kind == RowKind.LIST:
      samples.append({"id": f"list-{seed}", "question": LIST_QUESTION, "choices": None, "answer": "A",
                      "image": img})
      script_texts.append([list_text(objects)])
      train_answer.append(True)
      continue
    sample = {"id": f"scene-{seed}", "question": scenes.question(target.color), "choices": list(scenes.OPTIONS),
              "answer": letter, "image": img}
    if kind == RowKind.CLOSE_UP:
      sample["image"] = close_up_image(img, close_up_box(target, cfg, rng, curriculum=True), cfg)
      script_texts.append([answer_text(letter)])
      train_answer.append(True)
    else:
      j = int(rng.integers(len(objects)))
      script_texts.append([grounding_text(objects[j], BOX_LABEL, cfg.named_boxes), answer_text(letter)])
      train_answer.append(j == k)
    samples.append(sample)

  single = kind not in _TWO_TURNS
  rollout_cfg = cfg.rollout(engine_lib.RolloutMode.SINGLE_TURN if single else engine_lib.RolloutMode.MGPO)
  if kind in _REQUESTS:
    rollout_cfg = dataclasses.replace(rollout_cfg, prompts=refer_prompts(cfg.prompt_style, _REQUESTS[kind]))
  sp = special_token_ids(tokenizer)
  engine = engine_lib.RolloutEngine(
      ScriptedSampler(model_cfg, tokenizer, lambda r, turn: script_texts[r][turn], sp.pad, sp.im_end),
      tokenizer, rollout_cfg)
  rows = engine.run(samples, jax.random.key(0)).trajectories
  for tr, ok in zip(rows, train_answer):
    if not single and not tr.box_valid[0]:
      raise ValueError(f"a pretraining box was rejected ({tr.box_reasons[0]}): scene squares too small")
    s, e = tr.turn_spans[-1]
    tr.turn_mask[s:e] *= int(ok)
  return rows


def to_batch(rows, kind: RowKind, model_cfg: Qwen25VLConfig, cfg: PretrainConfig, pad_id: int):
  b = cfg.buckets[list(RowKind).index(kind)]
  n = 2 if kind in _TWO_TURNS else 1
  return traj_lib.to_train_batch(rows, list(range(len(rows))), seq_bucket=b.seq, patch_bucket=b.patches,
                                 max_images=n, pad_id=pad_id, vision_cfg=model_cfg.vision, max_turns=n,
                                 image_token_id=model_cfg.image_token_id)


# ------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------


def _seeds(base: int, n: int, offset: int) -> list[int]:
  return [int(x) for x in np.random.SeedSequence([base, offset]).generate_state(n, dtype=np.uint32)]


def kind_weights(mix: Sequence[float]) -> np.ndarray:
  """`PretrainConfig.mix` -> probabilities over `RowKind` (missing last weights are 0)."""
  n = len(RowKind)
  if not 1 <= len(mix) <= n or min(mix) < 0 or sum(mix) <= 0:
    raise ValueError(f"mix={tuple(mix)}: up to {n} weights >= 0 ({', '.join(RowKind)}), not all 0")
  p = np.asarray(tuple(mix) + (0.0,) * (n - len(mix)), np.float64)
  return p / p.sum()


def draw_kind(rng: np.random.Generator, p: np.ndarray) -> RowKind:
  """One step's row kind. Zero weights at the end leave the other kinds' draws as they were (the same
  cdf), so the committed base's 3-weight stages draw what they drew before the list rows existed."""
  return list(RowKind)[int(rng.choice(len(p), p=p))]


def run(cfg: PretrainConfig, out_dir: str) -> dict[str, Any]:
  """Trains the base from scratch into `out_dir` (tokenizer/, metrics.jsonl, hf/); returns the last eval."""
  p = kind_weights(cfg.mix)
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  tok_dir = os.path.join(out_dir, "tokenizer")
  if cfg.init_dir:
    tokenizer = tok_lib.load_tokenizer(cfg.init_dir)
    tokenizer.save_pretrained(tok_dir)
    model = params_lib.from_pretrained(cfg.init_dir)
    model_cfg = model.cfg
  else:
    tokenizer = tok_lib.build_tokenizer(tok_dir, vocab_size=cfg.vocab_size, corpus=task_corpus(cfg))
    model_cfg = cfg.model(tokenizer)
    model = params_lib.init_model(model_cfg, seed=cfg.seed)
  cfg.image().save_pretrained(tok_dir)  # travels with the tokenizer into the export: the base's view
  pad = tokenizer.pad_token_id
  kinds = list(RowKind)
  held_out = {k: to_batch(build_rows(k, _seeds(cfg.seed, cfg.num_eval, 1_000_000 + i), tokenizer, model_cfg, cfg),
                          k, model_cfg, cfg, pad) for i, k in enumerate(kinds)}
  tx = optim.make_optimizer(optim.OptimConfig(
      learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, grad_clip_norm=1.0,
      schedule=optim.Schedule.COSINE, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
      min_lr_ratio=cfg.min_lr_ratio))
  trainer = sft.SFTTrainer(model, tx)
  eval_fn = jax.jit(lambda p, b: sft.sft_loss(nnx.merge(trainer.graphdef, p), b, 1024))
  rng = np.random.default_rng([cfg.seed, 7])
  writer = metrics_lib.MetricsWriter(out_dir, total_steps=cfg.steps, tensorboard=False)
  t0, last = time.perf_counter(), {}
  try:
    for step in range(1, cfg.steps + 1):
      kind = draw_kind(rng, p)
      rows = build_rows(kind, _seeds(cfg.seed, cfg.batch_size, step), tokenizer, model_cfg, cfg)
      m = trainer.step(to_batch(rows, kind, model_cfg, cfg, pad))
      scalars = {f"pretrain/{kind}_loss": m["loss"], "pretrain/grad_norm": m["grad_norm"]}
      if step % cfg.eval_every == 0 or step == cfg.steps:
        for k, b in held_out.items():
          loss, count = jax.device_get(eval_fn(trainer.params(), b))
          # Per row: the refer box against ln(#cells), the answer against ln(#options).
          scalars[f"heldout/{k}_nll_per_row"] = float(loss) * float(count) / cfg.num_eval
        scalars["time/elapsed_s"] = time.perf_counter() - t0
        last = dict(scalars)
        logger.info("step %d %s", step, json.dumps({k: round(v, 4) for k, v in scalars.items()}))
      writer.write_scalars(step, scalars)
  finally:
    writer.close()
  root = os.path.join(out_dir, "checkpoints")
  ckpt_lib.save_params(root, trainer.params(), model_cfg.to_hf_dict(), step=cfg.steps, assets_from=tok_dir)
  ckpt_lib.export_hf(root, os.path.join(out_dir, "hf"), overwrite=True)
  return last


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the curriculum: `run` with these fields replaced, from the previous stage's base."""

  steps: int
  num_objects: int
  mix: tuple[float, ...]
  learning_rate: float
  seed: int = 0
  eval_every: int = 100
  named_boxes: bool = False


# The recipe of the committed base. A flat mix on four squares never learned to box even a square
# (bench/results/repro/base/probes): one square first teaches where (the position code -> digits), more
# squares and the mixed stages keep that on four (stages 1-5: boxes on some square 99%, on the named one at
# chance). The list rows then teach the colour -> square lookup (stage 6), and from stage 7 on the grounding
# answers name their square first (`named_boxes`), so the box is read right after the colour word: the
# referring box went from chance (17% IoU >= 0.5) to 100% over stages 7-10
# (bench/results/repro/base/probes/named/). Stage 10 boxed a random square in MGPO's turn 1 (the format
# rows train exactly that), and RL from it never learned to box the asked one (bench/results/repro/
# rl_probes/). Stage 11 adds grounded-conversation rows (the refer question inside MGPO's conversation):
# a short dose, so the habit transfers to the RL question only in part (100 steps of it: target hit 84%,
# "already most of the time"; 30: 23%; 50: 44%), and stage 12 restores the referring box the short,
# fast stage left at 70% without grounded rows, a few format rows holding the RL question's turn 1
# near chance (bench/results/repro/base/probes/grounded/).
CURRICULUM: tuple[Stage, ...] = (
    Stage(steps=800, num_objects=1, mix=(1.0, 0.0, 0.0), learning_rate=2e-3, eval_every=200),
    Stage(steps=500, num_objects=2, mix=(1.0, 0.0, 0.0), learning_rate=1e-3),
    Stage(steps=500, num_objects=4, mix=(1.0, 0.0, 0.0), learning_rate=1e-3),
    Stage(steps=1500, num_objects=4, mix=(0.6, 0.2, 0.2), learning_rate=1e-3, seed=3, eval_every=250),
    Stage(steps=1800, num_objects=4, mix=(0.7, 0.15, 0.15), learning_rate=1.5e-3, seed=4, eval_every=300),
    Stage(steps=600, num_objects=4, mix=(0.45, 0.05, 0.05, 0.45), learning_rate=1e-3, seed=6, eval_every=200),
    Stage(steps=600, num_objects=4, mix=(0.35, 0.1, 0.2, 0.35), learning_rate=1e-3, seed=7, eval_every=200,
          named_boxes=True),
    Stage(steps=600, num_objects=4, mix=(0.45, 0.05, 0.1, 0.4), learning_rate=1e-3, seed=8, eval_every=300,
          named_boxes=True),
    Stage(steps=600, num_objects=4, mix=(0.45, 0.05, 0.1, 0.4), learning_rate=1e-3, seed=9, eval_every=300,
          named_boxes=True),
    Stage(steps=900, num_objects=4, mix=(0.4, 0.05, 0.2, 0.35), learning_rate=1e-3, seed=10, eval_every=300,
          named_boxes=True),
    Stage(steps=50, num_objects=4, mix=(0.3, 0.1, 0.0, 0.3, 0.3), learning_rate=1e-3, seed=11, eval_every=50,
          named_boxes=True),
    Stage(steps=100, num_objects=4, mix=(0.45, 0.1, 0.1, 0.35), learning_rate=3e-4, seed=12, eval_every=100,
          named_boxes=True),
)


def run_curriculum(cfg: PretrainConfig, out_dir: str, stages: Sequence[Stage] = CURRICULUM) -> dict[str, Any]:
  """Runs `stages` in turn into <out_dir>/stage<k>/ (each continues the previous one's hf/, the first
  from `cfg.init_dir`) and copies the last one's base to <out_dir>/hf; returns the last eval. A stage
  whose hf/ exists is skipped, so the same command continues an interrupted recipe."""
  init, last = cfg.init_dir, {}
  for k, st in enumerate(stages, 1):
    stage_dir = os.path.join(out_dir, f"stage{k}")
    if not os.path.isfile(os.path.join(stage_dir, "hf", "config.json")):
      logger.info("stage %d/%d: %s", k, len(stages), st)
      last = run(dataclasses.replace(
          cfg, steps=st.steps, mix=st.mix, learning_rate=st.learning_rate, seed=st.seed, init_dir=init,
          eval_every=st.eval_every, named_boxes=st.named_boxes,
          warmup_steps=min(cfg.warmup_steps, st.steps - 1),
          scene=dataclasses.replace(cfg.scene, num_objects=st.num_objects)), stage_dir)
    init = os.path.join(stage_dir, "hf")
  shutil.copytree(init, os.path.join(out_dir, "hf"), dirs_exist_ok=True)
  return last


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  one_stage = ("steps", "seed", "init_dir", "learning_rate", "mix", "num_objects", "named_boxes")
  if _CURRICULUM.value:
    given = [f"--{n}" for n in one_stage if flags.FLAGS[n].present]
    if given:
      raise app.UsageError(f"{', '.join(given)} set a single stage: add --nocurriculum")
    cfg = dataclasses.replace(PretrainConfig(), batch_size=_BATCH.value,
                              scene=dataclasses.replace(PretrainConfig.scene, ring=_RING.value))
    print(json.dumps(run_curriculum(cfg, _OUT.value), indent=1))
    return
  cfg = dataclasses.replace(PretrainConfig(), steps=_STEPS.value, batch_size=_BATCH.value, seed=_SEED.value,
                            init_dir=_INIT_DIR.value, learning_rate=_LR.value,
                            warmup_steps=min(PretrainConfig.warmup_steps, _STEPS.value - 1),
                            mix=tuple(float(x) for x in _MIX.value),
                            eval_every=_EVAL_EVERY.value, named_boxes=_NAMED.value,
                            scene=dataclasses.replace(PretrainConfig.scene, ring=_RING.value,
                                                      num_objects=_NUM_OBJECTS.value))
  print(json.dumps(run(cfg, _OUT.value), indent=1))


if __name__ == "__main__":
  _OUT = flags.DEFINE_string("out", None, "Folder of the run; the base is written to <out>/hf.", required=True)
  _CURRICULUM = flags.DEFINE_bool("curriculum", True, "Run the committed base's recipe (CURRICULUM); "
                                  "--nocurriculum runs one stage from the flags below.")
  _STEPS = flags.DEFINE_integer("steps", PretrainConfig.steps, "Training steps.")
  _BATCH = flags.DEFINE_integer("batch_size", PretrainConfig.batch_size, "Rows per step.")
  _SEED = flags.DEFINE_integer("seed", PretrainConfig.seed, "Init and data seed.")
  _INIT_DIR = flags.DEFINE_string("init_dir", "", "Continue from this base (HF folder) instead of a random init.")
  _LR = flags.DEFINE_float("learning_rate", PretrainConfig.learning_rate, "Peak learning rate.")
  _MIX = flags.DEFINE_list("mix", [str(x) for x in PretrainConfig.mix], "Weights of refer, close_up, format, list, grounded steps (missing last ones are 0).")
  _EVAL_EVERY = flags.DEFINE_integer("eval_every", PretrainConfig.eval_every, "Held-out NLLs every this many steps.")
  _NAMED = flags.DEFINE_bool("named_boxes", PretrainConfig.named_boxes, "Grounding answers name their "
                             "square first (its colour and box, as in the list rows), then the JSON.")
  _RING = flags.DEFINE_integer("ring", PretrainConfig.scene.ring, "Squares as frames of this width (0: solid).")
  _NUM_OBJECTS = flags.DEFINE_integer("num_objects", PretrainConfig.scene.num_objects, "Squares per scene.")
  app.run(main)
