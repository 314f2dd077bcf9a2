"""The supervised warm-up: random boxes that never depend on the image, turn masks per row kind, the
conversation built by the real rollout engine, and an update that lowers the loss."""

import io

import numpy as np
import optax
import pytest
from PIL import Image

from mgpo_jax.data import schema, synthetic
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig
from mgpo_jax.rollout import crop, engine, prompts
from mgpo_jax.rollout.trajectory import to_train_batch
from mgpo_jax.models.qwen2_5_vl.chat import special_token_ids
from mgpo_jax.models.qwen2_5_vl.tokenizer import build_tokenizer
from mgpo_jax.learner import sft
from mgpo_jax.repro import warmup

IMAGE_CFG = ImageProcessorConfig(min_pixels=112 * 112, max_pixels=118 * 118)  # every image -> 112 x 112
GEN_CFG = synthetic.SyntheticConfig(image_size=(448, 512), target_size=(12, 16), categories=("pattern",),
                                    square=True, pattern_period=4, image_format="JPEG")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
  sp = special_token_ids(tok)
  cfg = Qwen25VLConfig(
      vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
      mrope_section=(2, 3, 3), image_token_id=sp.image_pad, video_token_id=sp.video_pad,
      vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end, eos_token_id=sp.im_end,
      pad_token_id=sp.pad,
      vision=VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=1, out_hidden_size=32,
                          window_size=56, fullatt_block_indexes=(0,)))
  samples = []
  for s in synthetic.generate_split(12, 5, GEN_CFG):
    s["image"] = Image.open(io.BytesIO(s["image"])).convert("RGB")
    samples.append(s)
  rollout_cfg = engine.RolloutConfig(image=IMAGE_CFG, prompts=prompts.prompt_style("short"))
  return tok, sp, cfg, samples, rollout_cfg


def test_grid_boxes_tile_the_input():
  boxes = warmup.grid_boxes(224, 196, 3)
  assert len(boxes) == 9 and boxes[0] == (0, 0, 75, 65) and boxes[-1] == (149, 131, 224, 196)
  area = sum((x2 - x1) * (y2 - y1) for x1, y1, x2, y2 in boxes)
  assert area == 224 * 196


def test_target_coverage():
  # Input 100 x 100 of a 400 x 400 original: box (0, 0, 50, 50) is the original's (0, 0, 200, 200).
  assert crop.target_coverage((0, 0, 50, 50), (100, 100), (400, 400), (180, 10, 220, 50)) == 0.5
  assert crop.target_coverage((0, 0, 50, 50), (100, 100), (400, 400), (10, 10, 20, 20)) == 1.0
  assert crop.target_coverage((50, 50, 100, 100), (100, 100), (400, 400), (10, 10, 20, 20)) == 0.0
  with pytest.raises(ValueError, match="positive area"):
    crop.target_coverage((0, 0, 50, 50), (100, 100), (400, 400), (10, 10, 10, 20))


def _turn_text(tok, tr, k):
  return tok.decode(tr.turn_tokens(k)[:-1].tolist()) if tr.turn_tokens(k).size else ""


def test_format_rows_random_boxes_do_not_depend_on_the_image(env):
  tok, _, cfg, samples, rollout_cfg = env
  data = warmup.WarmupData(box_grid=2)
  kinds = [warmup.RowKind.FORMAT] * 6
  a = warmup.build_rows(samples[:6], kinds, tok, cfg, rollout_cfg, data, np.random.default_rng(7))
  b = warmup.build_rows(samples[6:12], kinds, tok, cfg, rollout_cfg, data, np.random.default_rng(7))
  # Other images (other targets), same random stream: the same boxes.
  assert [t.boxes[0] for t in a] == [t.boxes[0] for t in b]
  grid = warmup.grid_boxes(112, 112, 2)
  for tr, s in zip(a, samples[:6]):
    assert tr.box_valid == [True] and tuple(tr.boxes[0]) in grid
    assert tr.turn_mask[slice(*tr.turn_spans[0])].all()  # the box is trained
    assert tr.texts[0] == warmup.box_text(tr.boxes[0], data.label)
    shows = crop.target_coverage(tr.boxes[0], (112, 112), s["image"].size, s["target_box"]) >= 0.5
    answer_mask = tr.turn_mask[slice(*tr.turn_spans[1])]
    assert answer_mask.all() if shows else not answer_mask.any()  # answer trained iff the crop shows it
    assert tr.texts[1] == warmup.answer_text(s["answer"])
    # The turn-2 image is the crop of the ORIGINAL at that box.
    expected = crop.crop_original(s["image"], tr.boxes[0], (112, 112))
    assert tr.images[1].size == expected.size
    assert np.array_equal(np.asarray(tr.images[1]), np.asarray(expected))


def test_close_up_boxes_hold_the_whole_target():
  rng = np.random.default_rng(0)
  cell = (0, 0, 75, 75)
  for target in ([500, 500, 560, 560], [5, 5, 60, 60], [930, 940, 990, 995]):
    sides = set()
    for _ in range(50):
      x1, y1, x2, y2 = warmup._close_up_box(target, (1000, 1000), (224, 224), cell, 3.0, rng)  # pylint: disable=protected-access
      assert 0 <= x1 < x2 <= 224 and 0 <= y1 < y2 <= 224 and x2 - x1 == y2 - y1 > 28
      assert crop.target_coverage((x1, y1, x2, y2), (224, 224), (1000, 1000), target) == 1.0
      sides.add(x2 - x1)
    assert min(sides) >= 29 and max(sides) <= 75 and len(sides) > 5  # from ~3 targets up to a grid cell


def test_close_up_rows_train_only_the_answer(env):
  tok, _, cfg, samples, rollout_cfg = env
  rows = warmup.build_rows(samples, [warmup.RowKind.CLOSE_UP] * len(samples), tok, cfg, rollout_cfg,
                        warmup.WarmupData(box_grid=2), np.random.default_rng(0))
  for tr, s in zip(rows, samples):
    assert not tr.turn_mask[slice(*tr.turn_spans[0])].any()
    assert tr.turn_mask[slice(*tr.turn_spans[1])].all()
    assert crop.target_coverage(tr.boxes[0], (112, 112), s["image"].size, s["target_box"]) == 1.0
    assert _turn_text(tok, tr, 1) == warmup.answer_text(s["answer"])


def test_single_turn_rows_and_mixed_batch(env):
  tok, sp, cfg, samples, rollout_cfg = env
  kinds = [warmup.RowKind.SINGLE_TURN, warmup.RowKind.FORMAT, warmup.RowKind.CLOSE_UP, warmup.RowKind.SINGLE_TURN]
  rows = warmup.build_rows(samples[:4], kinds, tok, cfg, rollout_cfg, warmup.WarmupData(box_grid=2),
                        np.random.default_rng(1))
  for tr, kind, s in zip(rows, kinds, samples):
    assert tr.num_turns == (1 if kind == warmup.RowKind.SINGLE_TURN else 2)
    assert tr.texts[-1] == warmup.answer_text(s["answer"])
  # Rows keep the order of `samples`; the chat template's single-turn system prompt is used.
  assert prompts.prompt_style("short").single_turn_system_prompt in tok.decode(rows[0].token_ids.tolist())
  with pytest.raises(ValueError, match="mix"):
    warmup.draw_kinds(3, warmup.WarmupData(mix=(0.0, 0.0, 0.0)), np.random.default_rng(0))
  no_target = dict(samples[0])
  del no_target[schema.TARGET_BOX]
  with pytest.raises(ValueError, match="target_box"):
    warmup.build_rows([no_target], [warmup.RowKind.CLOSE_UP], tok, cfg, rollout_cfg, warmup.WarmupData(),
                   np.random.default_rng(0))


def test_single_turn_rows_on_a_close_up(env):
  tok, _, cfg, samples, rollout_cfg = env
  data = warmup.WarmupData(box_grid=2, single_turn_view="close_up")
  rows = warmup.build_rows(samples[:6], [warmup.RowKind.SINGLE_TURN] * 6, tok, cfg, rollout_cfg, data,
                        np.random.default_rng(3))
  for tr, s in zip(rows, samples):
    assert tr.num_turns == 1 and tr.texts[-1] == warmup.answer_text(s["answer"])
    assert tr.turn_mask[slice(*tr.turn_spans[0])].all()
    view = tr.images[0]  # a region of the original, at full resolution, that holds the whole target
    assert view.size[0] < s["image"].size[0] // 2
    x1, y1, x2, y2 = s["target_box"]
    px = np.asarray(s["image"])
    found = [(x, y) for y in range(view.size[1] - (y2 - y1) + 1) for x in range(view.size[0] - (x2 - x1) + 1)
             if np.array_equal(np.asarray(view)[y:y + y2 - y1, x:x + x2 - x1], px[y1:y2, x1:x2])]
    assert found
  with pytest.raises(ValueError, match="single_turn_view"):
    warmup.WarmupData(single_turn_view="crop")


def test_sft_update_lowers_the_loss(env):
  tok, sp, cfg, samples, rollout_cfg = env
  kinds = warmup.draw_kinds(4, warmup.WarmupData(), np.random.default_rng(2))
  rows = warmup.build_rows(samples[:4], kinds, tok, cfg, rollout_cfg, warmup.WarmupData(box_grid=2),
                        np.random.default_rng(2))
  batch = to_train_batch(rows, list(range(4)), seq_bucket=384, patch_bucket=128, max_images=2, pad_id=sp.pad,
                         vision_cfg=cfg.vision, max_turns=2, image_token_id=cfg.image_token_id)
  trainer = sft.SFTTrainer(params_lib.init_model(cfg, seed=0), optax.adam(3e-3))
  first = trainer.step(batch)
  assert first["tokens"] == sum(int(t.turn_mask.sum()) for t in rows)
  for _ in range(15):
    last = trainer.step(batch)
  assert last["loss"] < 0.7 * first["loss"]
