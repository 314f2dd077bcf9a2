"""MGPO rollout on a tiny random model with the real chat template: turn masks, the crop, cache
continuation (trajectory log-probs == one full forward of the train batch), rewards, timings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import hf_reference as R
from mgpo_jax import sampling
from mgpo_jax.learner import step as learner_step
from mgpo_jax.models import qwen2_5_vl
from mgpo_jax.models.qwen2_5_vl.preprocess import ImageProcessorConfig, preprocess_image
from mgpo_jax.rollout import crop, engine, prompts
from mgpo_jax.rollout.trajectory import to_train_batch
from mgpo_jax.sampling import StopReason
from mgpo_jax.models.qwen2_5_vl.chat import render_chat, special_token_ids
from mgpo_jax.models.qwen2_5_vl.tokenizer import build_tokenizer

# Few buckets: both tests share one compiled turn-1 program.
SAMPLER_CFG = sampling.SamplerConfig(prompt_buckets=(512,), new_token_buckets=(64,), patch_buckets=(64,),
                                     image_buckets=(1,), cache_buckets=(2048,), max_top_k=4)
IMAGE_CFG = ImageProcessorConfig(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
BOX = (10, 20, 80, 70)  # valid in the 112 x 84 model input of the 200 x 180 original
TURN1_JSON = f'The key region:\n```json\n[{{"bbox_2d": {list(BOX)}, "label": "cat"}}]\n```'


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tok = build_tokenizer(tmp_path_factory.mktemp("tok"))
  sp = special_token_ids(tok)
  d = tmp_path_factory.mktemp("model")
  R.build_reference(d, seed=3, vocab=len(tok), image_token_id=sp.image_pad, video_token_id=sp.video_pad,
                    vision_start_token_id=sp.vision_start, vision_end_token_id=sp.vision_end,
                    eos_token_id=sp.im_end, bos_token_id=sp.endoftext, pad_token_id=sp.pad)
  model = qwen2_5_vl.from_pretrained(d)
  return tok, sp, model


class ForcingSampler(sampling.Sampler):
  """Teacher-forces chosen rows in chosen turns (the model's log-probs are still recorded)."""

  def __init__(self, *args, force, **kw):
    super().__init__(*args, **kw)
    self.force, self.turn = force, 0

  def _forced(self, kw):
    f = self.force.get(self.turn)
    self.turn += 1
    return dict(kw, force_tokens=f) if f is not None else kw

  def start(self, rows, images=None, **kw):
    self.turn = 0
    return super().start(rows, images, **self._forced(kw))

  def extend(self, conv, rows, images=None, **kw):
    return super().extend(conv, rows, images, **self._forced(kw))


def make_samples():
  rng = np.random.default_rng(0)
  img = lambda w, h: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
  return [
      {"question": "What is the color of the cat?", "choices": ["red", "blue", "green"], "answer": "B",
       "image": img(200, 180)},
      {"question": "Which sign is shown?", "choices": ["stop", "yield"], "answer": "A", "image": img(90, 130)},
  ]


def batch_kw(sp, model):
  """One TrainBatch shape for every test here (so the full forward compiles once)."""
  return dict(seq_bucket=1024, patch_bucket=256, max_images=3, pad_id=sp.pad, vision_cfg=model.cfg.vision,
              max_turns=3, num_rows=5)


def full_forward_logp(model, tb):
  """log p(token t | tokens < t) from one uncached forward of the padded train batch: the learner's
  (each group's prompt encoded once, every row's continuation attending to it)."""
  return np.asarray(_learner_logp(model, jax.tree.map(jnp.asarray, tb)))


_learner_logp = jax.jit(lambda m, b: learner_step.sequence_logprobs(m, b, chunk_size=256, temperature=1.0,
                                                                    compute_entropy=False)[0])


def expected_turn_text(tok, tr, k):
  """What the masked tokens of turn k must decode to: the model's text, its EOS, a forced <|im_end|>."""
  sampled = tr.turn_tokens(k)[:-1] if tr.forced_close[k] else tr.turn_tokens(k)
  text = tr.texts[k]
  if tr.stop_reasons[k] == StopReason.EOS:
    assert tok.convert_ids_to_tokens(int(sampled[-1])) in engine.RolloutConfig.eos_tokens
    text += tok.decode([int(sampled[-1])])
  return text + ("<|im_end|>" if tr.forced_close[k] else "")


def test_mgpo_rollout_masks_crop_continuation_and_reward(env):
  tok, sp, model = env
  enc = lambda s: tok.encode(s, add_special_tokens=False)
  # Row 0: a valid box (and text after the fence that must be cut), then "\boxed{B}" (correct).
  # Row 1: no JSON block -> invalid -> original image again, then "\boxed{C}" (wrong). Rows 2, 3: free.
  force = {0: [enc(TURN1_JSON + "\nTrailing words"), enc("I see no region"), [], []],
           1: [enc("It is blue, \\boxed{B}") + [sp.im_end], enc("\\boxed{C}") + [sp.im_end], [], []]}
  sampler = ForcingSampler(model, SAMPLER_CFG, tokenizer=tok, force=force)
  cfg = engine.RolloutConfig(num_generations=2, max_new_tokens=56, image=IMAGE_CFG, host_workers=2)
  samples = make_samples()
  res = engine.RolloutEngine(sampler, tok, cfg).run(samples, jax.random.key(0))
  trajs = res.trajectories
  assert [t.sample_index for t in trajs] == res.group_ids == [0, 0, 1, 1]

  # Turn masks select exactly the model's own text of each turn (+ the turn's closing token).
  for tr in trajs:
    assert tr.num_turns == 2 and len(tr.token_ids) == len(tr.turn_mask) == len(tr.logprobs)
    for k in range(2):
      assert tok.decode(tr.turn_tokens(k).tolist()) == expected_turn_text(tok, tr, k)
    assert (tr.logprobs[tr.turn_mask == 0] == 0).all() and (tr.logprobs[tr.turn_mask > 0] < 0).all()

  # Row 0: cut right after the JSON block, closed with a forced <|im_end|>, valid box, the crop fed.
  t0, t1 = trajs[0], trajs[1]
  assert t0.stop_reasons[0] == StopReason.STOP and t0.forced_close == [True, False]
  assert t0.texts[0] == TURN1_JSON and t0.box_valid == [True] and t0.boxes == [BOX]
  want_crop = crop.crop_original(samples[0]["image"], BOX, (112, 84))
  assert np.array_equal(np.asarray(t0.images[1]), np.asarray(want_crop))
  np.testing.assert_array_equal(t0.pixel_values[1], preprocess_image(want_crop, IMAGE_CFG)[0])
  assert t0.texts[1] == "It is blue, \\boxed{B}" and t0.reward == 1.0
  # Row 1: no box -> the original image again, with the "invalid" message; wrong answer.
  assert t1.box_valid == [False] and t1.box_reasons == ["no_json"] and t1.images[1] is samples[0]["image"]
  assert t1.reward == 0.0

  # The trajectory of row 0 is exactly the chat template's rendering of the whole conversation.
  pc = cfg.prompts
  conv = prompts.turn1_messages(samples[0]["question"], samples[0]["choices"], pc) + [
      {"role": "assistant", "content": TURN1_JSON},
      prompts.followup_user_message(samples[0]["question"], samples[0]["choices"], BOX, True, pc),
      {"role": "assistant", "content": t0.texts[1]}]
  n_img = [int(np.prod(g)) // 4 for g in t0.image_grids]
  rendered = render_chat(tok, conv, add_generation_prompt=False, num_tokens_per_image=n_img)
  assert tok.decode(t0.token_ids.tolist()) + "\n" == tok.decode(rendered)
  assert pc.invalid_box_intro in tok.decode(t1.token_ids.tolist())

  # The sampler's incremental log-probs (turn 2 continued from turn 1's cache, forced <|im_end|> included)
  # equal one full uncached forward over the compacted train batch.
  tb = to_train_batch(trajs, res.group_ids, image_token_id=sp.image_pad, **batch_kw(sp, model))
  assert tb.input_ids_BT.shape == (5, 1024) and tb.group_ids_B.tolist() == [0, 0, 1, 1, -1]
  assert tb.prefix_ids_GS.shape == (2, 1024) and tb.prefix_index_B[:4].tolist() == [0, 0, 1, 1]
  assert tb.valid_box_B[[0, 1, 4]].tolist() == [1, 0, 0]
  assert tb.rewards_B[:2].tolist() == [1.0, 0.0]
  ref = full_forward_logp(model, tb)
  m = tb.loss_mask_BT > 0
  assert m.sum() == sum(int(t.turn_mask.sum()) for t in trajs)
  np.testing.assert_allclose(tb.old_logp_BT[m], ref[m], atol=1e-5)
  np.testing.assert_array_equal(tb.turn_lengths_BK[:4, :2],
                                [[int(t.turn_mask[slice(*span)].sum()) for span in t.turn_spans] for t in trajs])

  # Host and device time are reported per turn.
  tm = res.timings
  assert len(tm.host_s) == len(tm.device_s) == len(tm.prep_s) == 2
  assert min(tm.device_s) > 0 and min(tm.host_s) > 0 and tm.total_s >= sum(tm.device_s)
  assert res.metrics["valid_box_rate"] >= 0.25 and res.metrics["reward_mean"] >= 0.25


def test_three_turns_regrounding(env):
  """max_turns=3: turn 2 asks for another region (boxes in the ORIGINAL's input pixels), turn 3 answers."""
  tok, sp, model = env
  enc = lambda s: tok.encode(s, add_special_tokens=False)
  box2 = (40, 10, 100, 60)
  json2 = f'```json\n[{{"bbox_2d": {list(box2)}, "label": "sign"}}]\n```'
  force = {0: [enc(TURN1_JSON), [], [], []], 1: [enc(json2), [], [], []]}
  sampler = ForcingSampler(model, SAMPLER_CFG, tokenizer=tok, force=force)
  cfg = engine.RolloutConfig(max_turns=3, num_generations=2, max_new_tokens=40, image=IMAGE_CFG, host_workers=2)
  samples = make_samples()
  res = engine.RolloutEngine(sampler, tok, cfg).run(samples, jax.random.key(2))
  t0 = res.trajectories[0]
  assert t0.num_turns == 3 and len(t0.images) == 3 and t0.boxes == [BOX, box2] and t0.box_valid == [True, True]
  assert np.array_equal(np.asarray(t0.images[2]), np.asarray(crop.crop_original(samples[0]["image"], box2, (112, 84))))
  text = tok.decode(t0.token_ids.tolist())
  assert text.count(cfg.prompts.regrounding_request) == 1 and text.count(cfg.prompts.analyse_crop) == 1
  assert len(res.timings.device_s) == 3 and len(res.timings.host_s) == 3
  for tr in res.trajectories:
    for k in range(3):
      assert tok.decode(tr.turn_tokens(k).tolist()) == expected_turn_text(tok, tr, k)
  tb = to_train_batch(res.trajectories, res.group_ids, image_token_id=sp.image_pad, **batch_kw(sp, model))
  m = tb.loss_mask_BT > 0
  np.testing.assert_allclose(tb.old_logp_BT[m], full_forward_logp(model, tb)[m], atol=1e-5)


def test_single_turn_mode(env):
  tok, sp, model = env
  sampler = sampling.Sampler(model, SAMPLER_CFG, tokenizer=tok)
  cfg = engine.RolloutConfig(mode=engine.RolloutMode.SINGLE_TURN, num_generations=2, max_new_tokens=20,
                             image=IMAGE_CFG, host_workers=2)
  samples = make_samples()
  res = engine.RolloutEngine(sampler, tok, cfg).run(samples, jax.random.key(1))
  for tr in res.trajectories:
    s = samples[tr.sample_index]
    _, grid = preprocess_image(s["image"], IMAGE_CFG)
    prompt = render_chat(tok, prompts.single_turn_messages(s["question"], s["choices"], cfg.prompts),
                         add_generation_prompt=True, num_tokens_per_image=[int(np.prod(grid)) // 4])
    assert tr.num_turns == 1 and tr.boxes == [] and len(tr.images) == 1
    assert tr.token_ids[:len(prompt)].tolist() == prompt and not tr.turn_mask[:len(prompt)].any()
    assert tok.decode(tr.turn_tokens(0).tolist()) == expected_turn_text(tok, tr, 0)
  assert len(res.timings.device_s) == 1


def test_config_and_input_errors(env):
  tok, sp, model = env
  with pytest.raises(ValueError, match="max_turns"):
    engine.RolloutConfig(max_turns=1)
  with pytest.raises(ValueError, match="reward"):
    engine.RolloutConfig(reward="nope")
  eng = engine.RolloutEngine(sampling.Sampler(model, SAMPLER_CFG, tokenizer=tok), tok,
                             engine.RolloutConfig(image=IMAGE_CFG, num_generations=1))
  with pytest.raises(ValueError, match="lacks"):
    eng.run([{"question": "q?", "answer": "A"}], jax.random.key(0))
