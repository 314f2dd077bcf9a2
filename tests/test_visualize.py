"""Tests for mgpo_jax.rollout.visualize: box drawing, the rollout pages and their TensorBoard copies."""

import os
import re

import numpy as np
from PIL import Image
import pytest

from mgpo_jax.io import events as events_lib
from mgpo_jax.io import metrics
from mgpo_jax.rollout import visualize as vis

GREEN, RED = np.array(vis.VALID_COLOR), np.array(vis.INVALID_COLOR)


def record(box=(100, 50, 400, 300), valid=True, input_size=(868, 644), size=(1921, 1427),
           crop=True, texts=("```json\n[...]\n```", "So \\boxed{B}."), reward=1.0, **kw):
  image = Image.new("RGB", size, (128, 128, 128))
  return vis.RolloutRecord(
      image=image, input_size=input_size, box=box, valid=valid,
      crop=Image.new("RGB", (60, 40), (10, 20, 200)) if crop else None, texts=list(texts),
      reward=reward, answer="B", **kw)


def test_box_is_mapped_with_the_protocol_formula():
  # Hand-computed (see tests/test_rollout_crop.py): 100*1921/868 = 221.3, 50*1427/644 = 110.8,
  # 400*1921/868 = 885.3, 300*1427/644 = 664.8.
  assert vis.box_on_original(record()) == (221, 110, 885, 664)
  assert vis.box_on_original(record(box=None)) is None


def test_invalid_boxes_are_clipped_or_dropped():
  # Past the right/bottom edge: 800*1921/868 = 1770.5, 600*1427/644 = 1329.5; the far corner
  # (2073.6, 1538.1) is clipped to the original's 1921x1427.
  assert vis.box_on_original(record(box=(800, 600, 900, 700), valid=False)) == (1770, 1329, 1921, 1427)
  # Corners swapped: ordered.
  assert vis.box_on_original(record(box=(400, 300, 100, 50), valid=False)) == (221, 110, 885, 664)
  # Entirely outside: nothing to draw.
  assert vis.box_on_original(record(box=(900, 0, 1000, 50), valid=False)) is None


@pytest.mark.parametrize("valid, color", [(True, GREEN), (False, RED)])
def test_draw_box_marks_the_mapped_box(valid, color):
  # Original 400x300, model input 200x150: input box (50, 40, 150, 100) -> original (100, 80, 300, 200).
  rec = record(box=(50, 40, 150, 100), valid=valid, input_size=(200, 150), size=(400, 300))
  img = np.asarray(vis.draw_box(rec, max_side=800))
  assert img.shape == (300, 400, 3)
  for y, x in ((80, 200), (199, 200), (140, 100), (140, 299)):  # One point on each side.
    np.testing.assert_array_equal(img[y, x], color)
  np.testing.assert_array_equal(img[140, 200], (128, 128, 128))  # Inside stays untouched.
  np.testing.assert_array_equal(img[20, 20], (128, 128, 128))
  # Scaled to max_side=200: the box scales with the image.
  small = np.asarray(vis.draw_box(rec, max_side=200))
  assert small.shape == (150, 200, 3)
  np.testing.assert_array_equal(small[40, 100], color)
  np.testing.assert_array_equal(small[70, 100], (128, 128, 128))


def test_render_rollout_puts_the_crop_beside_the_image():
  with_crop = vis.render_rollout(record(), max_side=400)
  without = vis.render_rollout(record(crop=False), max_side=400)
  assert with_crop.height == without.height
  assert with_crop.width > without.width
  # The crop is blue and scaled to the image's height; it sits in the right part.
  right = np.asarray(with_crop)[-5, -5]
  np.testing.assert_array_equal(right, (10, 20, 200))


def test_predicted_answer():
  assert vis.predicted_answer(record(texts=("a", "x \\boxed{A} y \\boxed{C}"))) == "C"
  assert vis.predicted_answer(record(texts=("no box",))) is None
  assert vis.predicted_answer(record(texts=())) is None


def test_html_page_and_index(tmp_path):
  records = [
      record(sample_id="s/0", question="Which <color>?", choices=["red", "blue"],
             texts=("<script>alert(1)</script>", "\\boxed{B}")),
      record(box=(0, 0, 10, 10), valid=False, crop=False, reward=0.0, box_reason="too_small"),
  ]
  page = vis.write_rollout_page(tmp_path, 7, records, max_side=300)
  assert page == os.path.join(tmp_path, "rollouts", "step_000007.html")
  html = open(page, encoding="utf-8").read()
  # Every image the page shows exists and is a PNG of at most max_side.
  srcs = re.findall(r'<img src="([^"]+)"', html)
  assert srcs == ["step_000007/r00_image.png", "step_000007/r00_crop.png", "step_000007/r01_image.png"]
  for src in srcs:
    with Image.open(os.path.join(tmp_path, "rollouts", src)) as im:
      assert im.format == "PNG" and max(im.size) <= 300
  # Texts are escaped, facts are shown.
  assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
  assert "Which &lt;color&gt;?" in html and "<li>red</li>" in html
  assert "reward 1" in html and "reward 0" in html
  assert "too_small" in html and "[221, 110, 885, 664] in the original" in html
  vis.write_rollout_page(tmp_path, 12, records[:1])
  vis.write_rollout_page(tmp_path, 3, records[:1])
  index = open(os.path.join(tmp_path, "rollouts", vis.INDEX_FILE), encoding="utf-8").read()
  assert re.findall(r'href="(step_\d+\.html)"', index) == [
      "step_000003.html", "step_000007.html", "step_000012.html"]


def test_log_rollouts_writes_tensorboard_and_html(tmp_path):
  records = [record(sample_id="a"), record(sample_id="b", crop=False, reward=0.0)]
  with metrics.MetricsWriter(tmp_path, is_primary=True) as w:
    vis.log_rollouts(w, 5, records)
  assert os.path.isfile(os.path.join(tmp_path, "rollouts", "step_000005.html"))
  events = events_lib.read_events(os.path.join(tmp_path, metrics.TENSORBOARD_DIR))
  images = {k: v for e in events if e.step == 5 for k, v in e.images.items()}
  texts = {k: v for e in events if e.step == 5 for k, v in e.texts.items()}
  assert sorted(images) == ["rollouts/00", "rollouts/01"] == sorted(texts)
  assert images["rollouts/00"][1] > images["rollouts/01"][1]  # Wider: it has the crop.
  assert "reward 1" in texts["rollouts/00"] and "\\boxed{B}" in texts["rollouts/00"]


def test_log_rollouts_off_the_primary_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricsWriter(workdir, is_primary=False) as w:
    vis.log_rollouts(w, 5, [record()])
  assert not workdir.exists()
