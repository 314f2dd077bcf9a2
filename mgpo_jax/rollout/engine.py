"""The MGPO multi-turn rollout: grounding turn(s) with host-side cropping, then the answer turn.

For B samples x n generations (one row each), with `max_turns` = K (default 2):

  host    preprocess each original image; render system + user 1 (image, question) with the chat template
  device  turn 1: prefill + sample until the end of the ```json block (stop rule) or EOS
  host    per row, in a thread pool: decode, parse the box, crop the ORIGINAL image (or keep the original
          if the box is missing / invalid), preprocess it, render the follow-up user message
  device  turn 2: the new chunk is appended to turn 1's KV cache (no re-prefill) and the answer sampled
  ...     (K > 2: turns 2..K-1 ask for another region, like turn 1)
  host    reward of the last turn's text

Turn closing. The chat template ends every assistant turn with `<|im_end|>`. If the model sampled it, it
is the turn's last sampled token. Otherwise (the turn was cut at its JSON block, hit the token limit, or
ended with another EOS id) the rollout appends `<|im_end|>` itself ("forced close"). A forced close is
kept in the turn mask by default (`train_on_forced_close`), with the model's own log-prob of `<|im_end|>`
at that position (the sampler computes it in its final loop step), so the learner's ratio is exact and
the policy is pushed towards closing turns itself; set it False to leave forced tokens out of the loss.
Text the stop token carries past the closing fence (e.g. "```\\n") stays, since the model sampled it.

Host work between turns (decode, parse, crop, preprocess, render) and device work (the sampler calls) are
timed separately (`RolloutTimings`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import enum
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from mgpo_jax.data import schema
from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig, num_image_tokens, preprocess_image
from mgpo_jax.rollout import crop as crop_lib
from mgpo_jax.rollout import parse as parse_lib
from mgpo_jax.rollout import prompts as prompts_lib
from mgpo_jax.rollout import reward as reward_lib
from mgpo_jax.rollout.trajectory import Trajectory
from mgpo_jax.sampling import SampleOutput, Sampler, StopReason
from mgpo_jax.models.qwen2_5_vl.chat import IMAGE_PAD, expand_image_pads, special_token_ids

# Stands for the model's text when rendering a follow-up turn; everything after it is the new chunk.
_SENTINEL = "<<mgpo:assistant-turn>>"


class RolloutMode(enum.StrEnum):
  MGPO = "mgpo"                # grounding turn(s), crop, answer turn
  SINGLE_TURN = "single_turn"  # GRPO baseline: one turn with `single_turn_messages`


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """Rollout settings (defaults: the paper's protocol)."""

  mode: RolloutMode = RolloutMode.MGPO
  max_turns: int = 2                      # MGPO only; 1 grounding turn + answer turn by default
  num_generations: int = 8                # rows per sample (the GRPO group)
  max_new_tokens: int = 1024              # per turn
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  image: ImageProcessorConfig = ImageProcessorConfig(min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
  prompts: prompts_lib.PromptConfig = prompts_lib.PromptConfig()
  reward: str = reward_lib.EXACT_MATCH
  lenient_parse: bool = False
  eos_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
  # Never sampled: a sampled <|image_pad|> would be read as an image placeholder by the learner's forward.
  banned_tokens: tuple[str, ...] = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
  train_on_forced_close: bool = True
  host_workers: int = 8
  # The random-crop control: a valid first box is replaced, before cropping, by the box of a random
  # object of the sample (`object_boxes`) or, without them, of a random cell of a 3 x 3 grid. The model's
  # own box stays in the trajectory (masks, loss and target_hit are about what it sampled).
  random_crop: bool = False

  def __post_init__(self):
    if self.max_turns < 1 or (self.mode == RolloutMode.MGPO and self.max_turns < 2):
      raise ValueError(f"max_turns={self.max_turns}: MGPO needs >= 2 (a grounding turn and an answer turn)")
    if self.num_generations < 1 or self.max_new_tokens < 1 or self.host_workers < 1:
      raise ValueError("num_generations, max_new_tokens and host_workers must be >= 1")
    RolloutMode(self.mode)
    reward_lib.get_reward_fn(self.reward)

  @property
  def num_turns(self) -> int:
    return 1 if self.mode == RolloutMode.SINGLE_TURN else self.max_turns


@dataclasses.dataclass
class RolloutTimings:
  """Wall-clock seconds. host_s[k]: host work that builds turn k's input (k = 0: preprocess + render the
  prompts; k > 0: decode, parse, crop, preprocess, render after turn k - 1). device_s[k]: turn k's sampler
  call from dispatch to tokens on the host; prep_s[k]: the sampler's own padding / vision bookkeeping
  before dispatch. final_host_s: decode + reward after the last turn."""

  host_s: list[float] = dataclasses.field(default_factory=list)
  prep_s: list[float] = dataclasses.field(default_factory=list)
  device_s: list[float] = dataclasses.field(default_factory=list)
  final_host_s: float = 0.0
  total_s: float = 0.0


@dataclasses.dataclass
class RolloutResult:
  trajectories: list[Trajectory]
  group_ids: list[int]
  timings: RolloutTimings
  metrics: dict[str, float]


@dataclasses.dataclass
class _Row:
  """Host-side state of one conversation while it is being sampled."""

  sample: Mapping[str, Any]
  sample_index: int
  generation_index: int
  original: Image.Image
  input_size: tuple[int, int]      # (W_in, H_in) of the original as the model sees it
  messages: list[dict[str, Any]]
  ids: list[np.ndarray] = dataclasses.field(default_factory=list)
  mask: list[np.ndarray] = dataclasses.field(default_factory=list)
  logp: list[np.ndarray] = dataclasses.field(default_factory=list)
  spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)
  images: list[Image.Image] = dataclasses.field(default_factory=list)
  pixel_values: list[np.ndarray] = dataclasses.field(default_factory=list)
  grids: list[np.ndarray] = dataclasses.field(default_factory=list)
  texts: list[str] = dataclasses.field(default_factory=list)
  boxes: list[Any] = dataclasses.field(default_factory=list)
  box_valid: list[bool] = dataclasses.field(default_factory=list)
  box_reasons: list[str] = dataclasses.field(default_factory=list)
  stop_reasons: list[int] = dataclasses.field(default_factory=list)
  forced_close: list[bool] = dataclasses.field(default_factory=list)
  crop_boxes: list[Any] = dataclasses.field(default_factory=list)  # the box each crop was cut from
  crop_rng: np.random.Generator | None = None  # random_crop only: the row's own draws
  reward: float = 0.0
  next_chunk: np.ndarray | None = None

  @property
  def length(self) -> int:
    return sum(len(x) for x in self.ids)

  def add(self, ids, mask, logp=None) -> None:
    ids = np.asarray(ids, np.int32).reshape(-1)
    self.ids.append(ids)
    self.mask.append(np.full(len(ids), mask, np.int32))
    self.logp.append(np.zeros(len(ids), np.float32) if logp is None else np.asarray(logp, np.float32))


class RolloutEngine:
  """Runs MGPO (or single-turn GRPO) rollouts with a `Sampler` whose tokenizer is `tokenizer`."""

  def __init__(self, sampler: Sampler, tokenizer, cfg: RolloutConfig = RolloutConfig()):
    self.sampler, self.tokenizer, self.cfg = sampler, tokenizer, cfg
    self.special = special_token_ids(tokenizer)
    if self.special.image_pad != sampler.model_cfg.image_token_id:
      raise ValueError(f"tokenizer's <|image_pad|> is id {self.special.image_pad}, the model's image_token_id is "
                       f"{sampler.model_cfg.image_token_id}: they must agree")
    vocab = tokenizer.get_vocab()
    missing = [t for t in cfg.eos_tokens + cfg.banned_tokens if t not in vocab]
    if missing:
      raise ValueError(f"RolloutConfig.eos_tokens / banned_tokens {missing} are not in the tokenizer")
    self.eos_ids = [vocab[t] for t in cfg.eos_tokens]
    self.banned_ids = [vocab[t] for t in cfg.banned_tokens]
    self.reward_fn = reward_lib.get_reward_fn(cfg.reward)
    merge = sampler.model_cfg.vision.spatial_merge_size
    if merge != cfg.image.merge_size:
      raise ValueError(f"image merge_size {cfg.image.merge_size} differs from the model's {merge}")

  # ------------------------------------------------------------------ host pieces (run in threads)
  def _render_first(self, sample_index: int, sample: Mapping[str, Any]):
    missing = [k for k in ("question", "answer", "image") if k not in sample]
    if missing:
      raise ValueError(f"sample {sample_index} lacks {missing} (needs a decoded sample: question, choices, "
                       "answer, PIL image)")
    image = sample["image"]
    if not isinstance(image, Image.Image):
      raise ValueError(f"sample {sample_index}: 'image' must be a PIL image, got {type(image).__name__}")
    cfg = self.cfg
    pv, grid = preprocess_image(image, cfg.image)
    choices = sample.get("choices")
    if cfg.mode == RolloutMode.SINGLE_TURN:
      messages = prompts_lib.single_turn_messages(sample["question"], choices, cfg.prompts)
    else:
      messages = prompts_lib.turn1_messages(sample["question"], choices, cfg.prompts)
    text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = self._encode(text, [grid])
    patch = cfg.image.patch_size
    return pv, grid, ids, messages, (int(grid[2]) * patch, int(grid[1]) * patch)

  def _encode(self, text: str, grids) -> np.ndarray:
    text = expand_image_pads(text, [num_image_tokens(g, self.cfg.image.merge_size) for g in grids], IMAGE_PAD)
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.int32)

  def _followup_chunk(self, row: _Row, message: dict[str, Any], grid) -> np.ndarray:
    """Tokens that close the assistant turn and open the next one: `<|im_end|>\\n<|im_start|>user ...
    <|im_start|>assistant\\n`, rendered by the chat template around a stand-in for the model's text."""
    history = row.messages + [{"role": "assistant", "content": _SENTINEL}, message]
    text = self.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    parts = text.split(_SENTINEL)
    if len(parts) != 2:
      raise ValueError("the chat template must render the assistant text verbatim, exactly once")
    ids = self._encode(parts[1], [grid])
    if len(ids) == 0 or ids[0] != self.special.im_end:
      raise ValueError("the chat template must close assistant turns with <|im_end|>")
    return ids

  def _after_turn(self, row: _Row, out: SampleOutput, r: int, turn: int) -> None:
    """Records turn `turn` of row r; for a grounding turn, builds the next chunk (parse, crop, render)."""
    cfg, sp = self.cfg, self.special
    n = int(out.lengths[r])
    toks, logp = out.tokens[r, :n], out.logprobs[r, :n]
    reason = int(out.stop_reasons[r])
    content = toks[:-1] if reason == StopReason.EOS else toks
    text = self.tokenizer.decode(content.tolist(), skip_special_tokens=False)
    start = row.length
    row.add(toks, 1, logp)
    row.texts.append(text)
    row.stop_reasons.append(reason)
    is_last = turn == cfg.num_turns - 1
    if is_last:
      row.spans.append((start, row.length))
      row.forced_close.append(False)
      row.reward = float(self.reward_fn(text, row.sample))
      return
    forced = not (n and toks[-1] == sp.im_end)
    if forced:
      row.add([sp.im_end], int(cfg.train_on_forced_close), [out.close_logprobs[r]])
    row.spans.append((start, row.length))
    row.forced_close.append(forced)

    w_in, h_in = row.input_size
    res = parse_lib.parse_bbox(text, w_in, h_in, lenient=cfg.lenient_parse)
    valid, why, image = res.valid, res.reason.value, row.original
    crop_box = random_crop_box(row) if valid and cfg.random_crop else res.box
    if valid:
      try:
        image = crop_lib.crop_original(row.original, crop_box, row.input_size)
      except ValueError:  # the box maps to an empty region of a small original
        valid, why = False, "empty_crop"
    row.boxes.append(res.box)
    row.crop_boxes.append(crop_box if valid else None)
    row.box_valid.append(valid)
    row.box_reasons.append(why)
    pv, grid = preprocess_image(image, cfg.image)
    s = row.sample
    message = prompts_lib.followup_user_message(s["question"], s.get("choices"), crop_box if valid else None,
                                                valid, cfg.prompts, is_last_turn=turn + 1 == cfg.num_turns - 1)
    chunk = self._followup_chunk(row, message, grid)
    row.messages = row.messages + [{"role": "assistant", "content": text}, message]
    row.add(chunk[1:], 0)   # the closing <|im_end|> is already recorded as the turn's token
    row.next_chunk = chunk[1:] if not forced else chunk
    row.images.append(image)
    row.pixel_values.append(pv)
    row.grids.append(grid)

  # ------------------------------------------------------------------ the rollout
  def run(self, samples: Sequence[Mapping[str, Any]], rng) -> RolloutResult:
    """Samples `num_generations` conversations per sample; returns trajectories, timings and metrics.

    Every row draws from its own key, fold_in(rng, crc32(sample id), generation, turn): a sample's
    rollouts do not depend on which other samples share the batch (or the host, in multi-host runs).
    """
    cfg = self.cfg
    if not samples:
      raise ValueError("no samples")
    t_start = time.perf_counter()
    timings = RolloutTimings()
    sample_kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, eos_token_ids=self.eos_ids,
                     close_token_id=self.special.im_end, pad_id=self.special.pad,
                     banned_token_ids=self.banned_ids)
    with concurrent.futures.ThreadPoolExecutor(max_workers=cfg.host_workers) as pool:
      t0 = time.perf_counter()
      firsts = list(pool.map(self._render_first, range(len(samples)), samples))
      rows = []
      for i, (sample, (pv, grid, ids, messages, input_size)) in enumerate(zip(samples, firsts)):
        for g in range(cfg.num_generations):
          row = _Row(sample=sample, sample_index=i, generation_index=g, original=sample["image"],
                     input_size=input_size, messages=messages)
          row.add(ids, 0)
          row.images.append(sample["image"])
          row.pixel_values.append(pv)
          row.grids.append(grid)
          row.next_chunk = ids
          rows.append(row)
      timings.host_s.append(time.perf_counter() - t0)

      row_keys = _row_keys(rng, np.asarray([(_sample_uid(row), row.generation_index) for row in rows], np.uint32))
      if cfg.random_crop:  # each row draws its control crops from its own key, like its tokens
        for row, bits in zip(rows, np.asarray(jax.random.key_data(row_keys)).reshape(len(rows), -1)):
          row.crop_rng = np.random.default_rng(bits.tolist())
      conv = None
      for turn in range(cfg.num_turns):
        is_last = turn == cfg.num_turns - 1
        chunks = [row.next_chunk for row in rows]
        images = [(row.pixel_values[-1], row.grids[-1][None]) for row in rows]
        kw = dict(sample_kw, max_new_tokens=cfg.max_new_tokens, rng=_fold_rows(row_keys, turn),
                  stop=() if is_last else (parse_lib.TURN1_STOP,))
        if conv is None:
          out, conv = self.sampler.start(chunks, images, **kw)
        else:
          out, conv = self.sampler.extend(conv, chunks, images, **kw)
        timings.prep_s.append(out.prep_s)
        timings.device_s.append(out.device_s)
        t0 = time.perf_counter()
        list(pool.map(lambda r: self._after_turn(rows[r], out, r, turn), range(len(rows))))
        if is_last:
          timings.final_host_s = time.perf_counter() - t0
        else:
          timings.host_s.append(time.perf_counter() - t0)
    del conv
    trajectories = [self._trajectory(row) for row in rows]
    timings.total_s = time.perf_counter() - t_start
    return RolloutResult(trajectories=trajectories, group_ids=[row.sample_index for row in rows],
                         timings=timings, metrics=_metrics(trajectories))

  @staticmethod
  def _trajectory(row: _Row) -> Trajectory:
    return Trajectory(
        token_ids=np.concatenate(row.ids), turn_mask=np.concatenate(row.mask), logprobs=np.concatenate(row.logp),
        turn_spans=row.spans, images=row.images, pixel_values=row.pixel_values, image_grids=row.grids,
        texts=row.texts, boxes=row.boxes, crop_boxes=row.crop_boxes, box_valid=row.box_valid, box_reasons=row.box_reasons,
        stop_reasons=row.stop_reasons, forced_close=row.forced_close, reward=row.reward,
        target_hit=_target_hit(row), sample_index=row.sample_index, generation_index=row.generation_index)


# A crop "finds" the target when it holds at least this share of the target's area.
TARGET_HIT_COVERAGE = 0.5


def _target_hit(row: _Row) -> float | None:
  """Whether the row's first box found the sample's target (None: no target_box, or no grounding turn)."""
  target = row.sample.get(schema.TARGET_BOX)
  if target is None or not row.box_valid or tuple(int(v) for v in target) == schema.NO_BOX:
    return None
  if not row.box_valid[0]:
    return 0.0
  cover = crop_lib.target_coverage(row.boxes[0], row.input_size, row.original.size, target)
  return float(cover >= TARGET_HIT_COVERAGE)


def random_crop_box(row: _Row) -> tuple[int, int, int, int]:
  """The random-crop control's box (input pixels): a random object of the sample, its box rounded
  outwards, or a random cell of a 3 x 3 grid when the sample has no object boxes."""
  (w_in, h_in), (w, h) = row.input_size, row.original.size
  objects = row.sample.get(schema.OBJECT_BOXES) or []
  if objects:
    x1, y1, x2, y2 = objects[int(row.crop_rng.integers(len(objects)))]
    return (int(x1 * w_in // w), int(y1 * h_in // h), min(w_in, -(-x2 * w_in // w)), min(h_in, -(-y2 * h_in // h)))
  i, j = (int(v) for v in row.crop_rng.integers(3, size=2))
  return (i * w_in // 3, j * h_in // 3, (i + 1) * w_in // 3, (j + 1) * h_in // 3)


def _sample_uid(row: _Row) -> int:
  """A stable 31-bit id of the row's sample (its id string; the batch index when it has none)."""
  return zlib.crc32(str(row.sample.get("id", row.sample_index)).encode()) & 0x7FFFFFFF


@jax.jit
def _row_keys(rng, uids_R2):
  fold = lambda u: jax.random.fold_in(jax.random.fold_in(rng, u[0]), u[1])
  return jax.vmap(fold)(uids_R2)


_fold_rows = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


def _metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
  m = {"reward_mean": float(np.mean([t.reward for t in trajectories]))}
  if trajectories[0].box_valid:
    m["valid_box_rate"] = float(np.mean([t.box_valid[0] for t in trajectories]))
  hits = [t.target_hit for t in trajectories if t.target_hit is not None]
  if hits:
    m["target_hit_rate"] = float(np.mean(hits))
  for k in range(max(t.num_turns for t in trajectories)):
    m[f"turn{k + 1}_tokens_mean"] = float(np.mean([t.turn_mask[slice(*t.turn_spans[k])].sum()
                                                   for t in trajectories if t.num_turns > k]))
  return m
