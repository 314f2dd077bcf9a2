"""Tests of the Grain input pipeline: guards, sharding, determinism and checkpointed state."""

import io
import logging

import numpy as np
import pytest
from PIL import Image

from mgpo_jax.data import pipeline
from mgpo_jax.data import schema
from mgpo_jax.data import synthetic

SMALL = synthetic.SyntheticConfig(image_size=(64, 80), target_size=(8, 12), clutter_per_mpix=400)
LOGGER = "mgpo_jax.data.pipeline"


@pytest.fixture(scope="module")
def good():
  return synthetic.generate_split(10, 0, SMALL)


def _record(sid, **image):
  return {"id": sid, "question": "q?", "choices": ["a", "b", "c", "d"], "answer": "B", "category": "x", **image}


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
  # A valid 20000x20000 1-bit PNG: ~50 KB on disk, 400M pixels once decoded.
  buf = io.BytesIO()
  Image.new("1", (20000, 20000)).save(buf, format="PNG")
  return buf.getvalue()


def _truncated_jpeg() -> bytes:
  rng = np.random.default_rng(0)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
  data = buf.getvalue()
  return data[: len(data) * 2 // 3]


def _ids(batches):
  return [[s[schema.ID] for s in b] for b in batches]


def _fingerprint(batches):
  return [[(s[schema.ID], s[schema.IMAGE].size, s[schema.IMAGE].tobytes()) for s in b] for b in batches]


def _make(source, **kw):
  args = dict(batch_size=3, seed=0, shuffle=True, num_epochs=1, shard_index=0, shard_count=1)
  args.update(kw)
  return pipeline.make_dataset(source, **args)


def test_bad_images_skipped_with_one_log_line_each(good, bomb_png, tmp_path, caplog):
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(_truncated_jpeg())
  bad = [
      _record("bad-missing", image_path=str(tmp_path / "no_such.jpg")),
      _record("bad-truncated", image_path=str(truncated)),
      _record("bad-bomb", image=bomb_png),
  ]
  source = good[:5] + bad[:1] + good[5:8] + bad[1:] + good[8:]
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    batches = list(_make(source, batch_size=4, shuffle=False, even_shards=False))
  # The good ones all come through, in order, in full batches.
  assert _ids(batches) == _ids([good[0:4], good[4:8], good[8:10]])
  for b in batches:
    for s in b:
      assert isinstance(s[schema.IMAGE], Image.Image) and s[schema.IMAGE].mode == "RGB"
  # Exactly one line per bad sample, naming it and the reason.
  lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
  assert len(lines) == 3
  by_id = {sid: [l for l in lines if sid in l] for sid in ("bad-missing", "bad-truncated", "bad-bomb")}
  assert all(len(v) == 1 for v in by_id.values()), lines
  assert "not found" in by_id["bad-missing"][0]
  assert "truncated" in by_id["bad-truncated"][0]
  assert "decompression-bomb" in by_id["bad-bomb"][0]
  assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == LOGGER)


def test_own_pixel_guard_checks_the_header(caplog):
  buf = io.BytesIO()
  Image.new("RGB", (300, 200), (1, 2, 3)).save(buf, format="PNG")
  ok = _record("fits", image=buf.getvalue())
  decode = pipeline.DecodeImage(max_image_pixels=300 * 200)
  assert decode(ok)[schema.IMAGE].size == (300, 200)
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    assert pipeline.DecodeImage(max_image_pixels=300 * 200 - 1)(ok) is None
    assert pipeline.DecodeImage()(_record("junk", image=b"\x89PNG not really")) is None
  msgs = [r.getMessage() for r in caplog.records]
  assert "300x200 = 60000 pixels > 59999" in msgs[0] and "fits" in msgs[0]
  assert "junk" in msgs[1] and "BytesIO object" not in msgs[1]


def test_decoded_image_matches_source_pixels(good):
  (batch,) = list(_make(good[:2], batch_size=2, shuffle=False))
  for s, orig in zip(batch, good[:2]):
    want = np.asarray(Image.open(io.BytesIO(orig[schema.IMAGE])).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(s[schema.IMAGE]), want)
    assert s[schema.CHOICES] == orig[schema.CHOICES] and s[schema.ANSWER] == orig[schema.ANSWER]


@pytest.mark.parametrize("count, even, sizes", [(2, True, [5, 5]), (3, True, [3, 3, 3]), (3, False, [4, 3, 3])])
def test_shards_are_disjoint_and_cover(good, count, even, sizes):
  per_shard = []
  for i in range(count):
    batches = list(_make(good, batch_size=2, shard_index=i, shard_count=count, even_shards=even))
    per_shard.append({s[schema.ID] for b in batches for s in b})
  assert [len(s) for s in per_shard] == sizes
  union = set().union(*per_shard)
  assert len(union) == sum(sizes)  # Disjoint.
  assert union <= {s[schema.ID] for s in good}
  if sum(sizes) == len(good):
    assert union == {s[schema.ID] for s in good}


def test_shuffle_is_deterministic_and_epochs_differ(good):
  a = _ids(_make(good, batch_size=5, seed=1, num_epochs=2))
  b = _ids(_make(good, batch_size=5, seed=1, num_epochs=2))
  c = _ids(_make(good, batch_size=5, seed=2, num_epochs=2))
  assert a == b and a != c
  epoch1, epoch2 = a[0] + a[1], a[2] + a[3]
  assert sorted(epoch1) == sorted(epoch2) == sorted(s[schema.ID] for s in good)
  assert epoch1 != epoch2  # Reshuffled every epoch.
  assert epoch1 != [s[schema.ID] for s in good]


def test_remainder_batches():
  src = [_record(f"s{i}", image=_tiny_png()) for i in range(7)]
  assert [len(b) for b in _make(src, batch_size=3)] == [3, 3, 1]
  assert [len(b) for b in _make(src, batch_size=3, drop_remainder=True)] == [3, 3]


def _tiny_png() -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (8, 8), (5, 6, 7)).save(buf, format="PNG")
  return buf.getvalue()


@pytest.mark.parametrize("read_threads", [0, 2])
def test_state_save_restore_continues_identically(good, tmp_path, read_threads):
  source = good[:4] + [_record("bad", image_path=str(tmp_path / "gone.png"))] + good[4:]
  ds = _make(source, batch_size=3, seed=5, num_epochs=3, read_threads=read_threads)
  full = _fingerprint(iter(ds))
  assert len(full) == 10  # 3 epochs x 10 good samples, batched by 3.

  k = 4  # Stops inside the second epoch.
  it = iter(ds)
  head = [next(it) for _ in range(k)]
  state = it.get_state()
  tail = _fingerprint(it)
  assert _fingerprint(head) + tail == full

  fresh = iter(_make(source, batch_size=3, seed=5, num_epochs=3, read_threads=read_threads))
  fresh.set_state(state)
  assert _fingerprint(fresh) == tail


def test_orbax_checkpoint_of_iterator(good, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  ds = _make(good, batch_size=2, seed=3, num_epochs=None)
  it = iter(ds)
  for _ in range(3):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=pipeline.save_args(it)))
    mngr.wait_until_finished()
  expected = _fingerprint([next(it) for _ in range(6)])  # Crosses an epoch boundary.

  fresh = iter(_make(good, batch_size=2, seed=3, num_epochs=None))
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=pipeline.restore_args(fresh)))
  assert restored["data"] is fresh
  assert _fingerprint([next(fresh) for _ in range(6)]) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(shard_index=2, shard_count=2), "shard_index"),
        (dict(max_image_pixels=0), "max_image_pixels"),
    ],
)
def test_bad_arguments(good, kwargs, match):
  with pytest.raises(ValueError, match=match):
    _make(good, **kwargs)


def test_empty_shard_rejected(good):
  with pytest.raises(ValueError, match="empty"):
    _make(good[:1], shard_index=1, shard_count=2, even_shards=False)


def test_default_shard_is_this_process(good):
  batches = list(pipeline.make_dataset(good, batch_size=4, seed=0, shuffle=False))
  assert _ids(batches) == _ids([good[0:4], good[4:8], good[8:10]])


def test_worker_processes_give_the_same_batches(good):
  ref = _fingerprint(_make(good, batch_size=4, seed=9))
  it = iter(_make(good, batch_size=4, seed=9, worker_count=1))
  try:
    assert _fingerprint(it) == ref
  finally:
    it.close()
