"""A visual log of a few rollouts: the image with the predicted box, the crop, the texts, the reward.

Every `train.visualize_every` steps the training loop passes a few `RolloutRecord`s to
`log_rollouts`, which writes

  <workdir>/rollouts/step_000123.html        one card per rollout
  <workdir>/rollouts/step_000123/r00_*.png   the images it shows (original with box, crop)
  <workdir>/rollouts/index.html              links to every step's page

and the same rollouts into TensorBoard (one side-by-side image and one markdown text each).

The box is drawn where the crop was taken: the model answers in pixels of the resized input
(`input_size`), which are mapped to the original image with the protocol's formula
(`rollout.crop.map_box_to_original`). A valid box is drawn green, an invalid one red (clipped to
the image, as far as it can be drawn at all).
"""

from __future__ import annotations

import dataclasses
import html
import io
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from mgpo_jax.io import metrics as metrics_lib
from mgpo_jax.io import paths
from mgpo_jax.rollout import crop as crop_lib
from mgpo_jax.rollout import reward as reward_lib

ROLLOUTS_DIR = "rollouts"
INDEX_FILE = "index.html"
VALID_COLOR = (0, 200, 0)
INVALID_COLOR = (230, 0, 0)
_STEP_PAGE = re.compile(r"^step_(\d+)\.html$")

Box = tuple[int, int, int, int]


@dataclasses.dataclass
class RolloutRecord:
  """What the visual log shows of one rollout (plain host data, produced by the rollout engine).

  Attributes:
    image: the original image (RGB).
    input_size: (W_in, H_in), the size of the original as given to the model.
    box: the turn-1 box in input pixels as parsed (also when invalid), or None if none parsed.
    valid: whether the box passed the protocol's checks (and a crop was shown).
    crop: the image shown in turn 2 (the crop of the original), or None.
    texts: the model's text of each turn.
    reward: the rollout's reward.
    answer: the ground-truth answer (option letter).
    question: the question.
    choices: the option texts (letters A, B, ... in order).
    sample_id: the sample's id.
    box_reason: why the box is invalid (`rollout.parse.BBoxReason` value), if it is.
  """

  image: Image.Image
  input_size: tuple[int, int]
  box: Box | None
  valid: bool
  crop: Image.Image | None
  texts: Sequence[str]
  reward: float
  answer: str
  question: str = ""
  choices: Sequence[str] = ()
  sample_id: str = ""
  box_reason: str = ""


def box_on_original(record: RolloutRecord) -> Box | None:
  """The record's box in original-image pixels, clipped to the image; None if it cannot be drawn."""
  if record.box is None:
    return None
  w, h = record.image.size
  try:
    return crop_lib.map_box_to_original(record.box, record.input_size, (w, h))
  except ValueError:
    pass
  # An invalid box (outside the image, corners swapped): same formula, then clipped and ordered.
  try:
    x1, y1, x2, y2 = (int(v) for v in record.box)
    w_in, h_in = (int(v) for v in record.input_size)
  except (TypeError, ValueError):
    return None
  if w_in <= 0 or h_in <= 0:
    return None
  xs = sorted(min(max(int(x / w_in * w), 0), w) for x in (x1, x2))
  ys = sorted(min(max(int(y / h_in * h), 0), h) for y in (y1, y2))
  if xs[0] == xs[1] or ys[0] == ys[1]:
    return None
  return xs[0], ys[0], xs[1], ys[1]


def _fit(image: Image.Image, max_side: int) -> Image.Image:
  scale = min(1.0, max_side / max(image.size))
  img = image.convert("RGB")
  if scale < 1.0:
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                     Image.Resampling.BILINEAR)
  return img


def draw_box(record: RolloutRecord, max_side: int = 768) -> Image.Image:
  """The original image, scaled to at most `max_side`, with the record's box drawn on it."""
  img = _fit(record.image, max_side)
  box = box_on_original(record)
  if box is not None:
    sx, sy = img.width / record.image.width, img.height / record.image.height
    x1, y1, x2, y2 = box
    width = max(2, round(max(img.size) / 200))
    ImageDraw.Draw(img).rectangle(
        (x1 * sx, y1 * sy, max(x1 * sx, x2 * sx - 1), max(y1 * sy, y2 * sy - 1)),
        outline=VALID_COLOR if record.valid else INVALID_COLOR, width=width)
  return img


def predicted_answer(record: RolloutRecord) -> str | None:
  """The content of the last \\boxed{} of the final turn, if any."""
  return reward_lib.last_boxed(record.texts[-1]) if record.texts else None


def _box_text(record: RolloutRecord) -> str:
  if record.box is None:
    return "no box"
  reason = f" ({record.box_reason})" if record.box_reason and not record.valid else ""
  return f"box {list(record.box)} {'valid' if record.valid else 'invalid'}{reason}"


def _caption(record: RolloutRecord) -> str:
  return (f"reward {record.reward:g} | answer {record.answer} | predicted "
          f"{predicted_answer(record)} | {_box_text(record)}")


def render_rollout(record: RolloutRecord, max_side: int = 512) -> Image.Image:
  """One picture of a rollout: a caption, the original with its box, and the crop beside it."""
  left = draw_box(record, max_side)
  panels = [left]
  if record.crop is not None:
    crop = record.crop.convert("RGB")
    scale = left.height / crop.height
    panels.append(crop.resize((max(1, round(crop.width * scale)), left.height),
                              Image.Resampling.BILINEAR))
  gap, caption_h = 8, 18
  caption = _caption(record)
  text_w = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(caption)
  width = sum(p.width for p in panels) + gap * (len(panels) - 1)
  out = Image.new("RGB", (max(width, int(text_w) + 6), left.height + caption_h), "white")
  draw = ImageDraw.Draw(out)
  draw.text((2, 3), caption, fill=(0, 0, 0))
  x = 0
  for p in panels:
    out.paste(p, (x, caption_h))
    x += p.width + gap
  return out


def _markdown(record: RolloutRecord) -> str:
  """TensorBoard text of a rollout (markdown; turn texts as code blocks)."""
  parts = [f"**{_caption(record)}**", ""]
  if record.sample_id:
    parts.append(f"id: `{record.sample_id}`")
  if record.question:
    parts.append(f"question: {record.question}")
  for i, text in enumerate(record.texts, 1):
    parts += ["", f"turn {i}:", "", "    " + text.replace("\n", "\n    ")]
  return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# HTML pages.
# ------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 1em; }
.card { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em; margin-bottom: 1.2em; }
.ok { color: #080; } .bad { color: #c00; }
img { max-width: 48%; vertical-align: top; margin-right: 1%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.5em; white-space: pre-wrap; word-break: break-word; }
"""


def _png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


def _card(i: int, record: RolloutRecord, image_dir: str) -> str:
  e = html.escape
  good = record.reward > 0
  original = box_on_original(record)
  lines = [
      f'<div class="card" id="r{i:02d}">',
      f"<h3>#{i} {e(record.sample_id)} &mdash; "
      f'<span class="{"ok" if good else "bad"}">reward {record.reward:g}</span></h3>',
      f"<p>answer <b>{e(record.answer)}</b>, predicted <b>{e(str(predicted_answer(record)))}</b>"
      f"; {e(_box_text(record))}"
      + (f" = {list(original)} in the original" if original is not None else "")
      + f"; input {record.input_size[0]}x{record.input_size[1]}, original "
      f"{record.image.width}x{record.image.height}</p>",
  ]
  if record.question:
    lines.append(f"<p><b>Question:</b> {e(record.question)}</p>")
  if record.choices:
    items = "".join(f"<li>{e(c)}</li>" for c in record.choices)
    lines.append(f'<ol type="A">{items}</ol>')
  lines.append(f'<img src="{image_dir}/r{i:02d}_image.png" alt="original with box">')
  if record.crop is not None:
    lines.append(f'<img src="{image_dir}/r{i:02d}_crop.png" alt="crop">')
  for t, text in enumerate(record.texts, 1):
    lines.append(f"<p><b>Turn {t}</b></p><pre>{e(text)}</pre>")
  lines.append("</div>")
  return "\n".join(lines)


def _page(title: str, body: str) -> str:
  return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}"
          f"</title><style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def write_rollout_page(workdir: str | os.PathLike, step: int, records: Sequence[RolloutRecord],
                       max_side: int = 768) -> str:
  """Writes the step's HTML page and PNGs, refreshes index.html; returns the page's path."""
  join = paths.join_path
  folder = join(os.fspath(workdir), ROLLOUTS_DIR)
  image_dir = f"step_{step:06d}"
  paths.makedirs(join(folder, image_dir))
  for i, record in enumerate(records):
    prefix = join(folder, image_dir, f"r{i:02d}")
    paths.write_file(f"{prefix}_image.png", _png(draw_box(record, max_side)))
    if record.crop is not None:
      paths.write_file(f"{prefix}_crop.png", _png(_fit(record.crop, max_side)))
  rewards = [r.reward for r in records]
  mean = sum(rewards) / len(rewards) if rewards else float("nan")
  body = [f'<p><a href="{INDEX_FILE}">all steps</a></p>',
          f"<h1>Step {step}</h1><p>{len(records)} rollouts, mean reward {mean:.3g}</p>"]
  body += [_card(i, r, image_dir) for i, r in enumerate(records)]
  page = join(folder, f"{image_dir}.html")
  paths.write_file(page, _page(f"rollouts at step {step}", "\n".join(body)).encode("utf-8"))
  _write_index(folder)
  return page


def _write_index(folder: str) -> None:
  steps = sorted(int(m.group(1)) for name in paths.list_dir(folder)
                 if (m := _STEP_PAGE.match(name)))
  items = "\n".join(f'<li><a href="step_{s:06d}.html">step {s}</a></li>' for s in steps)
  body = f"<h1>Rollouts</h1>\n<ul>\n{items}\n</ul>"
  paths.write_file(paths.join_path(folder, INDEX_FILE),
                         _page("rollouts", body).encode("utf-8"))


def log_rollouts(writer: metrics_lib.MetricsWriter, step: int, records: Sequence[RolloutRecord],
                 max_side: int = 768, tensorboard_max_side: int = 512) -> None:
  """The HTML page (in writer.workdir) and TensorBoard images/texts; no-op off the primary.

  `max_side` bounds the page's PNGs, `tensorboard_max_side` the original in TensorBoard's
  side-by-side pictures (kept smaller: event files hold every one of them).
  """
  if not writer.is_primary or not records:
    return
  write_rollout_page(writer.workdir, step, records, max_side)
  writer.write_images(step, {f"rollouts/{i:02d}": render_rollout(r, tensorboard_max_side)
                             for i, r in enumerate(records)})
  writer.write_texts(step, {f"rollouts/{i:02d}": _markdown(r) for i, r in enumerate(records)})


def record_from_trajectory(trajectory, sample: Mapping[str, Any], patch_size: int = 14) -> RolloutRecord:
  """The visual-log record of a rollout (`rollout.Trajectory`) of `sample` (a decoded sample)."""
  grid = np.asarray(trajectory.image_grids[0]).reshape(3)
  input_size = (int(grid[2]) * patch_size, int(grid[1]) * patch_size)  # (W_in, H_in) the model saw
  has_box = bool(trajectory.boxes)
  valid = has_box and bool(trajectory.box_valid[0])
  return RolloutRecord(
      image=trajectory.images[0], input_size=input_size,
      box=trajectory.boxes[0] if has_box else None, valid=valid,
      crop=trajectory.images[1] if valid and len(trajectory.images) > 1 else None,
      texts=list(trajectory.texts), reward=float(trajectory.reward), answer=str(sample.get("answer", "")),
      question=str(sample.get("question", "")), choices=list(sample.get("choices", ())),
      sample_id=str(sample.get("id", "")),
      box_reason=trajectory.box_reasons[0] if has_box and trajectory.box_reasons else "")
