"""The laptop-scale task and the base's pretraining: scenes, labelled rows (built by the real rollout
engine), the random-crop control, and a reduced recipe run end to end with its gates."""

import dataclasses
import io
import json
import os

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from mgpo_jax.data import readers, scenes, schema
from mgpo_jax.learner import sft
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
from mgpo_jax.models.qwen2_5_vl.chat import special_token_ids
from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig, preprocess_image
from mgpo_jax.repro import gates, pretrain
from mgpo_jax.rollout import engine
from mgpo_jax.rollout import parse as parse_lib

SCENE = scenes.SceneConfig(input_side=112, num_objects=3, object_side=30, dot_side=2, jitter=2)
CFG = pretrain.PretrainConfig(
    steps=8, batch_size=4, warmup_steps=2, eval_every=4, num_eval=4, vocab_size=400, scene=SCENE,
    buckets=(pretrain.Bucket(160, 64), pretrain.Bucket(160, 64), pretrain.Bucket(320, 128), pretrain.Bucket(160, 64),
             pretrain.Bucket(320, 128)),
    hidden_size=64, num_layers=1, num_heads=2, vision_hidden_size=16, vision_depth=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tok = tok_lib.build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=CFG.vocab_size,
                                corpus=pretrain.task_corpus(CFG))
  return tok, CFG.model(tok)


def _decode(sample):
  return Image.open(io.BytesIO(sample[schema.IMAGE])).convert("RGB")


# ------------------------------------------------------------------------------------------------
# Scenes.
# ------------------------------------------------------------------------------------------------


def test_scene_samples_are_deterministic_and_answer_the_dot_of_the_named_square():
  a, b = list(scenes.iter_split(6, 3, SCENE)), list(scenes.iter_split(6, 3, SCENE))
  assert [s[schema.IMAGE] for s in a] == [s[schema.IMAGE] for s in b]
  for s in a:
    schema.normalize_sample(s)  # a valid sample of the common schema
    img = np.asarray(_decode(s))
    assert img.shape == (SCENE.side, SCENE.side, 3)
    x1, y1, x2, y2 = s[schema.TARGET_BOX]
    assert s[schema.TARGET_BOX] in s[schema.OBJECT_BOXES] and len(s[schema.OBJECT_BOXES]) == SCENE.num_objects
    color = s[schema.QUESTION].split(" the ")[-1].split(" square")[0]
    assert tuple(img[y1 + 1, x1 + 1]) == scenes.COLORS[color]  # the named square is the target
    dot = scenes.OPTIONS[schema.OPTION_LETTERS.index(s[schema.ANSWER])]
    assert tuple(img[(y1 + y2) // 2, (x1 + x2) // 2]) == scenes.DOT_COLORS[dot]
    boxes = s[schema.OBJECT_BOXES]
    for i, p in enumerate(boxes):  # squares never touch
      for q in boxes[i + 1:]:
        assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]


def test_the_dot_is_a_few_pixels_of_the_view_and_most_of_a_patch_in_the_crop():
  """What makes the crop necessary: the dots change only a dot-sized spot of the model's view of the
  scene, and fill about a 14 px patch in the view of a crop of their square."""
  cfg = scenes.SceneConfig()
  image_cfg = pretrain.PretrainConfig().image()
  views, crops = [], []
  for dot in scenes.OPTIONS:
    img, objects = scenes.render_scene(np.random.default_rng(0), cfg, dots=[dot] * cfg.num_objects)
    views.append(preprocess_image(img, image_cfg)[0])
    crops.append(preprocess_image(pretrain.close_up_image(img, objects[0].box_in,
                                                          pretrain.PretrainConfig()), image_cfg)[0])
  view_px = max(int((np.abs(views[0] - v).reshape(-1, 3, 2, 196).max((1, 2)) > 0.05).sum()) for v in views[1:])
  crop_px = min(int((np.abs(crops[0] - c).reshape(-1, 3, 2, 196).max((1, 2)) > 0.05).sum()) for c in crops[1:])
  # 4 squares x a 3 px dot (up to 6 x 6 px with the resize's blur) in the view; a ~19 px dot in a crop.
  assert view_px <= cfg.num_objects * 36
  assert crop_px >= 14 * 14


def test_framed_squares_show_the_position_coding_background_inside():
  solid, framed = scenes.SceneConfig(num_objects=1, ring=0), scenes.SceneConfig(num_objects=1, ring=6)
  img_s, (obj,) = scenes.render_scene(np.random.default_rng(3), solid)
  img_f, (obj_f,) = scenes.render_scene(np.random.default_rng(3), framed)
  assert obj == obj_f  # same scene, only the drawing differs
  x0, y0, x1, y1 = obj.box
  a_s, a_f = np.asarray(img_s, np.int32), np.asarray(img_f, np.int32)
  edge, inner = a_f[y0 + 2, (x0 + x1) // 2], a_f[y0 + 20, x0 + 20]  # on the frame; inside, off the dot
  assert tuple(edge) == scenes.COLORS[obj.color] and tuple(a_s[y0 + 20, x0 + 20]) == scenes.COLORS[obj.color]
  # Inside the frame: the background's code, red growing with x and green with y.
  assert inner[2] == 130 and abs(inner[0] - (90 + 110 * (x0 + 20) / (solid.side - 1))) <= 1
  assert abs(inner[1] - (90 + 110 * (y0 + 20) / (solid.side - 1))) <= 1
  mid = (x0 + x1) // 2
  assert (a_s[(y0 + y1) // 2, mid] == a_f[(y0 + y1) // 2, mid]).all()  # the dot is the same
  with pytest.raises(ValueError, match="ring"):
    scenes.SceneConfig(ring=17)


def test_scenes_source_carries_object_boxes_through_the_reader():
  got = list(readers.read_source(readers.SourceKind.SCENES, n=3, seed=1, config=SCENE))
  assert len(got) == 3 and all(len(s[schema.OBJECT_BOXES]) == SCENE.num_objects for s in got)
  padded = dict(got[0], object_boxes=got[0][schema.OBJECT_BOXES] + [list(schema.NO_BOX)] * 2)
  assert schema.normalize_sample(padded)[schema.OBJECT_BOXES] == got[0][schema.OBJECT_BOXES]


def test_scene_config_rejects_boxes_the_protocol_would_reject():
  with pytest.raises(ValueError, match="larger than 28"):
    scenes.SceneConfig(object_side=28)
  with pytest.raises(ValueError, match="do not fit"):
    scenes.SceneConfig(input_side=112, object_side=30, num_objects=6)


# ------------------------------------------------------------------------------------------------
# Pretraining rows.
# ------------------------------------------------------------------------------------------------


def _text(tok, tr, k):
  return tok.decode(tr.turn_tokens(k).tolist()[:-1])  # without the closing <|im_end|>


def _rows_and_scenes(env, kind, n):
  """(row, the scene's squares, the asked square's index) of `n` rows of `kind`, seeds 0..n-1."""
  tok, model_cfg = env
  rows = pretrain.build_rows(kind, list(range(n)), tok, model_cfg, CFG)
  for seed, tr in zip(range(n), rows):
    _, objects, k, _ = pretrain._decoded(seed, CFG)  # pylint: disable=protected-access
    yield tr, objects, k


def test_refer_rows_answer_the_named_squares_box(env):
  tok, _ = env
  for tr, objects, k in _rows_and_scenes(env, pretrain.RowKind.REFER, 6):
    t = objects[k]
    assert _text(tok, tr, 0) == pretrain.box_text(t.box_in, f"{t.color} square")
    prompt = tok.decode(tr.token_ids[:tr.turn_spans[0][0]].tolist())
    assert pretrain.REFER_QUESTION.format(color=t.color) in prompt and scenes.question(t.color) not in prompt
    assert len(tr.images) == 1 and tr.num_turns == 1


def test_list_rows_put_each_colour_word_right_before_its_squares_box(env):
  tok, _ = env
  for tr, objects, _ in _rows_and_scenes(env, pretrain.RowKind.LIST, 4):
    text = _text(tok, tr, 0)
    assert text == pretrain.list_text(objects)
    for o in objects:  # the colour word, then its box: the next token after the colour is a digit of it
      assert o.color + ",".join(f"{v:03d}" for v in o.box_in) in text
    ids = tr.turn_tokens(0).tolist()
    colour_ids = {tok.encode(" " + o.color, add_special_tokens=False)[0] for o in objects}
    assert sum(i in colour_ids for i in ids) == len(objects)
    for j, i in enumerate(ids[:-1]):
      if i in colour_ids:
        assert tok.decode([ids[j + 1]]).isdigit()
    prompt = tok.decode(tr.token_ids[:tr.turn_spans[0][0]].tolist())
    assert pretrain.LIST_QUESTION in prompt and pretrain.LIST_REQUEST in prompt
    assert len(tr.images) == 1 and tr.num_turns == 1 and tr.turn_mask[slice(*tr.turn_spans[0])].all()


@pytest.mark.parametrize("kind", [pretrain.RowKind.REFER, pretrain.RowKind.FORMAT])
def test_named_boxes_name_the_boxed_square_then_give_the_parsed_json(env, kind):
  """With `named_boxes` a grounding answer starts with its square's list entry (colour word, then that
  square's box) and the parser still reads the same box from the fenced JSON after it."""
  tok, model_cfg = env
  named = dataclasses.replace(CFG, named_boxes=True)
  plain = pretrain.build_rows(kind, list(range(6)), tok, model_cfg, CFG)
  rows = pretrain.build_rows(kind, list(range(6)), tok, model_cfg, named)
  for seed, tr, old in zip(range(6), rows, plain):
    _, objects, k, _ = pretrain._decoded(seed, CFG)  # pylint: disable=protected-access
    text, old_text = _text(tok, tr, 0), _text(tok, old, 0)
    box = parse_lib.parse_bbox(text, SCENE.input_side, SCENE.input_side).box
    assert box == parse_lib.parse_bbox(old_text, SCENE.input_side, SCENE.input_side).box  # same square boxed
    (boxed,) = [o for o in objects if tuple(o.box_in) == box]
    if kind == pretrain.RowKind.REFER:
      assert boxed is objects[k]
    assert text == f"The square: {pretrain.entry_text(boxed)}.\n{old_text}"
    ids = tr.turn_tokens(0).tolist()
    colour = tok.encode(" " + boxed.color, add_special_tokens=False)[0]
    assert tok.decode([ids[ids.index(colour) + 1]]).isdigit()
    # Everything else (the prompt, the answer turn and its mask) is unchanged.
    assert tr.token_ids[:tr.turn_spans[0][0]].tolist() == old.token_ids[:old.turn_spans[0][0]].tolist()
    if kind == pretrain.RowKind.FORMAT:
      assert _text(tok, tr, 1) == _text(tok, old, 1)
      assert tr.turn_mask[slice(*tr.turn_spans[1])].sum() == old.turn_mask[slice(*old.turn_spans[1])].sum()


def test_zero_weights_of_later_kinds_keep_the_recipes_draws():
  """The committed base's first stages give 3 weights; the later kinds (list, grounded) must not change
  which kinds they drew (the draws before those rows existed: `rng.choice(3, p=mix)`)."""
  for mix in ((0.35, 0.35, 0.3), (0.6, 0.2, 0.2), (1.0, 0.0, 0.0)):
    old, new = np.random.default_rng([3, 7]), np.random.default_rng([3, 7])
    before = [list(pretrain.RowKind)[int(old.choice(3, p=np.asarray(mix) / sum(mix)))] for _ in range(300)]
    p = pretrain.kind_weights(mix)
    assert p.shape == (5,) and p[3] == p[4] == 0
    assert [pretrain.draw_kind(new, p) for _ in range(300)] == before
  assert pretrain.kind_weights((0, 0, 0, 1.0)).tolist() == [0, 0, 0, 1.0, 0]
  assert pretrain.kind_weights((0, 0, 0, 0, 2.0)).tolist() == [0, 0, 0, 0, 1.0]
  for bad in ((1.0, 0, 0, 0, 1.0, 1.0), (0.0, 0.0), (1.0, -0.5)):
    with pytest.raises(ValueError, match="mix"):
      pretrain.kind_weights(bad)


def test_close_up_rows_show_the_asked_square_and_train_the_answer(env):
  tok, model_cfg = env
  rows = pretrain.build_rows(pretrain.RowKind.CLOSE_UP, list(range(8)), tok, model_cfg, CFG)
  for seed, tr in zip(range(8), rows):
    img, objects, k, _ = pretrain._decoded(seed, CFG)  # pylint: disable=protected-access
    letter = schema.letter(scenes.OPTIONS.index(objects[k].dot))
    assert _text(tok, tr, 0) == pretrain.answer_text(letter)
    view = np.asarray(tr.images[0])
    assert tuple(view[view.shape[0] // 2, view.shape[1] // 2]) in (  # the dot or its square, near the middle
        scenes.DOT_COLORS[objects[k].dot], scenes.COLORS[objects[k].color]) or view.shape[0] < img.height // 2


def test_format_rows_box_a_random_square_whatever_the_question(env):
  """The base never learns which square a question needs: the turn-1 box is a square drawn independently
  of the question (so it is the asked one about 1 / num_objects of the time), and the answer is trained
  only when it is."""
  tok, model_cfg = env
  seeds = list(range(90))
  rows = pretrain.build_rows(pretrain.RowKind.FORMAT, seeds, tok, model_cfg, CFG)
  hits = 0
  for seed, tr in zip(seeds, rows):
    _, objects, k, _ = pretrain._decoded(seed, CFG)  # pylint: disable=protected-access
    assert tr.num_turns == 2 and tr.box_valid == [True]
    j = [o.box_in for o in objects].index(tuple(tr.boxes[0]))
    assert _text(tok, tr, 0) == pretrain.box_text(objects[j].box_in, pretrain.BOX_LABEL)
    s, e = tr.turn_spans[1]
    assert tr.turn_mask[s:e].any() == (j == k)
    hits += j == k
  assert 0.15 < hits / len(seeds) < 0.55  # 1/3 expected with three squares


def test_grounded_rows_box_the_named_square_in_the_mgpo_conversation_and_never_ask_the_rl_question(env):
  """Referring grounding under MGPO's prompt: the refer question, turn 1 the named square's box (trained),
  the crop of it shown, turn 2 untrained."""
  tok, model_cfg = env
  named = dataclasses.replace(CFG, named_boxes=True)
  for seed, tr in zip(range(6), pretrain.build_rows(pretrain.RowKind.GROUNDED, list(range(6)), tok, model_cfg,
                                                    named)):
    _, objects, k, _ = pretrain._decoded(seed, CFG)  # pylint: disable=protected-access
    t = objects[k]
    assert tr.num_turns == 2 and tr.box_valid == [True] and tuple(tr.boxes[0]) == tuple(t.box_in)
    assert _text(tok, tr, 0) == pretrain.grounding_text(t, pretrain.BOX_LABEL, named=True)
    prompt = tok.decode(tr.token_ids[:tr.turn_spans[0][0]].tolist())
    assert pretrain.REFER_QUESTION.format(color=t.color) in prompt and scenes.question(t.color) not in prompt
    assert "Key region" in prompt  # MGPO's grounding request, not the refer rows' request
    assert pretrain.REFER_REQUEST not in prompt
    assert tr.turn_mask[slice(*tr.turn_spans[0])].all() and not tr.turn_mask[slice(*tr.turn_spans[1])].any()
  batch = pretrain.to_batch(pretrain.build_rows(pretrain.RowKind.GROUNDED, [0, 1], tok, model_cfg, named),
                            pretrain.RowKind.GROUNDED, model_cfg, named, tok.pad_token_id)
  assert batch.image_grid_BI3.shape == (2, 2, 3)  # both images of the conversation


def test_close_up_boxes_hold_the_dot():
  rng = np.random.default_rng(0)
  for seed in range(40):
    _, objects, k, _ = pretrain._decoded(seed, CFG)  # pylint: disable=protected-access
    x1, y1, x2, y2 = objects[k].box_in
    bx1, by1, bx2, by2 = pretrain.close_up_box(objects[k], CFG, rng, curriculum=True)
    assert bx2 - bx1 == by2 - by1 and 0 <= bx1 and bx2 <= SCENE.input_side
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    assert bx1 <= cx <= bx2 and by1 <= cy <= by2


@pytest.mark.parametrize("kind", [pretrain.RowKind.FORMAT, pretrain.RowKind.GROUNDED])
def test_pretraining_update_lowers_the_loss(env, kind):
  tok, model_cfg = env
  rows = pretrain.build_rows(kind, list(range(4)), tok, model_cfg, CFG)
  batch = pretrain.to_batch(rows, kind, model_cfg, CFG, tok.pad_token_id)
  trainer = sft.SFTTrainer(params_lib.init_model(model_cfg, seed=0), optax.adam(3e-3))
  first = trainer.step(batch)
  assert first["tokens"] == sum(int(t.turn_mask.sum()) for t in rows)
  for _ in range(15):
    last = trainer.step(batch)
  assert last["loss"] < 0.7 * first["loss"]


# ------------------------------------------------------------------------------------------------
# The random-crop control.
# ------------------------------------------------------------------------------------------------


def test_random_crop_control_replaces_the_box_before_cropping(env):
  tok, model_cfg = env
  sp = special_token_ids(tok)
  samples = []
  for s in scenes.iter_split(4, 9, SCENE):
    samples.append(dict(schema.normalize_sample(s), image=_decode(s)))
  first = [[round(v * SCENE.input_side / SCENE.side) for v in s[schema.OBJECT_BOXES][0]] for s in samples]

  def script(r, turn):  # every row boxes its sample's first square
    return pretrain.box_text(first[r // 8], "x") if turn == 0 else pretrain.answer_text("A")

  def run(random_crop, seed=0):
    cfg = dataclasses.replace(CFG.rollout(engine.RolloutMode.MGPO), num_generations=8, random_crop=random_crop)
    eng = engine.RolloutEngine(pretrain.ScriptedSampler(model_cfg, tok, script, sp.pad, sp.im_end), tok, cfg)
    return eng.run(samples, jax.random.key(seed)).trajectories

  plain = run(False)
  assert all(tr.crop_boxes == tr.boxes for tr in plain)
  control = run(True)
  picked = set()
  for tr in control:
    s = samples[tr.sample_index]
    in_boxes = [tuple(v * SCENE.input_side // SCENE.side for v in b) for b in s[schema.OBJECT_BOXES]]
    assert tuple(tr.boxes[0]) == tuple(first[tr.sample_index])  # the model's own box is kept
    assert tuple(tr.crop_boxes[0]) in in_boxes  # the crop is a square of the scene ...
    picked.add((tr.sample_index, in_boxes.index(tuple(tr.crop_boxes[0]))))
    assert f"{list(tr.crop_boxes[0])}" in tok.decode(tr.token_ids.tolist())  # ... and the text names it
    x1, y1, x2, y2 = tr.crop_boxes[0]
    assert abs(tr.images[1].width - (x2 - x1) * SCENE.scale) <= 1  # the crop shown is that square's region
    assert abs(tr.images[1].height - (y2 - y1) * SCENE.scale) <= 1
  assert len(picked) >= 2 * len(samples)  # random per row, not one square per sample
  again = run(True)
  assert [tr.crop_boxes for tr in again] == [tr.crop_boxes for tr in control]  # drawn from the rows' keys
  assert [tr.crop_boxes for tr in run(True, seed=1)] != [tr.crop_boxes for tr in control]


# ------------------------------------------------------------------------------------------------
# The recipe end to end, reduced, and the gates.
# ------------------------------------------------------------------------------------------------


def test_reduced_recipe_writes_a_base_that_loads_and_is_measured(tmp_path):
  out = str(tmp_path / "base")
  last = pretrain.run(CFG, out)
  assert {f"heldout/{k}_nll_per_row" for k in pretrain.RowKind} <= set(last)
  hf = os.path.join(out, "hf")
  assert ImageProcessorConfig.from_pretrained(hf) == CFG.image()
  with open(os.path.join(out, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == list(range(1, CFG.steps + 1))
  g = gates.measure_dir(hf, CFG, num=4, batch=4)
  for k in ("refer_iou50", "close_up_acc", "full_image_acc", "mgpo_acc", "mgpo_valid_box", "mgpo_target_hit"):
    assert 0.0 <= g[k] <= 1.0
  assert set(g["gates"]) == {"refer_iou50 >= 0.8", "close_up_acc >= 0.9", "|full_image_acc - chance| <= 0.1"}
  # A second stage continues from the base's weights and tokenizer.
  stage2 = dataclasses.replace(CFG, steps=3, warmup_steps=1, eval_every=3, init_dir=hf, mix=(1.0, 0.0, 0.0))
  pretrain.run(stage2, str(tmp_path / "stage2"))
  with open(os.path.join(out, "hf", "tokenizer.json")) as a, open(os.path.join(tmp_path, "stage2", "hf",
                                                                                "tokenizer.json")) as b:
    assert a.read() == b.read()


def test_curriculum_chains_stages_and_resumes(tmp_path, monkeypatch):
  stages = (pretrain.Stage(steps=2, num_objects=1, mix=(1.0, 0.0, 0.0), learning_rate=1e-3, eval_every=2),
            pretrain.Stage(steps=2, num_objects=3, mix=(0.0, 0.0, 1.0), learning_rate=1e-3, seed=5, eval_every=2,
                           named_boxes=True))
  out = str(tmp_path / "cur")
  seen, build_rows = set(), pretrain.build_rows
  def recording(kind, seeds, tokenizer, model_cfg, cfg):
    seen.add((cfg.scene.num_objects, cfg.named_boxes))
    return build_rows(kind, seeds, tokenizer, model_cfg, cfg)
  monkeypatch.setattr(pretrain, "build_rows", recording)
  pretrain.run_curriculum(CFG, out, stages)
  assert seen == {(1, False), (3, True)}  # each stage's fields reach its rows
  rows = {}
  for k in (1, 2):
    with open(os.path.join(out, f"stage{k}", "metrics.jsonl")) as f:
      rows[k] = [json.loads(line) for line in f]
  assert all("pretrain/refer_loss" in r for r in rows[1]) and all("pretrain/format_loss" in r for r in rows[2])
  final = params_lib.from_pretrained(os.path.join(out, "hf"))
  stage2 = params_lib.from_pretrained(os.path.join(out, "stage2", "hf"))
  stage1 = params_lib.from_pretrained(os.path.join(out, "stage1", "hf"))
  w = lambda m: np.asarray(m.lm_head[...])
  np.testing.assert_array_equal(w(final), w(stage2))
  assert not np.array_equal(w(stage1), w(stage2))  # stage 2 trained on from stage 1
  # Done stages are skipped: a second call changes nothing.
  before = os.path.getmtime(os.path.join(out, "stage1", "hf", "config.json"))
  pretrain.run_curriculum(CFG, out, stages)
  assert os.path.getmtime(os.path.join(out, "stage1", "hf", "config.json")) == before


def test_iou():
  assert gates.iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
  assert gates.iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
  assert gates.iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
