"""Tests for mgpo_jax.io.metrics and io.events: metrics.jsonl (incl. resume), TensorBoard event files, progress bar."""

import io
import json
import os
import struct

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from mgpo_jax.io import events as events_lib
from mgpo_jax.io import metrics
from mgpo_jax.io import paths


def _lines(workdir):
  with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _event_files(workdir):
  d = os.path.join(workdir, metrics.TENSORBOARD_DIR)
  return sorted(os.path.join(d, f) for f in os.listdir(d))


# ------------------------------------------------------------------------------------------------
# TFRecord framing and the Event protobuf.
# ------------------------------------------------------------------------------------------------


def test_crc32c_check_value():
  # The CRC-32C check value (RFC 3720, B.4) and the all-zero 32-byte vector of the same appendix.
  assert events_lib.crc32c(b"123456789") == 0xE3069283
  assert events_lib.crc32c(bytes(32)) == 0x8A9136AA


def test_record_framing_by_hand():
  data = b"hello"
  rec = events_lib.tfrecord(data)
  assert len(rec) == 8 + 4 + len(data) + 4
  assert struct.unpack("<Q", rec[:8])[0] == len(data)
  crc = events_lib.crc32c(data)
  masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF  # TensorFlow's mask.
  assert struct.unpack("<I", rec[-4:])[0] == masked
  assert rec[12:-4] == data
  assert list(events_lib.read_records(rec + events_lib.tfrecord(b""))) == [data, b""]


def test_read_records_rejects_corruption_and_ignores_a_torn_tail():
  recs = events_lib.tfrecord(b"first") + events_lib.tfrecord(b"second")
  assert list(events_lib.read_records(recs + events_lib.tfrecord(b"third")[:10])) == [b"first", b"second"]
  bad = bytearray(recs)
  bad[14] ^= 0xFF  # A byte of "first".
  with pytest.raises(ValueError, match="corrupt record data at byte 0"):
    list(events_lib.read_records(bytes(bad)))
  bad = bytearray(recs)
  bad[0] ^= 0x01  # The length of the first record.
  with pytest.raises(ValueError, match="corrupt record length"):
    list(events_lib.read_records(bytes(bad)))


def _event_class():
  """Event & co. built with the protobuf runtime from the numbers in TensorFlow's .proto files."""
  F = descriptor_pb2.FieldDescriptorProto
  fdp = descriptor_pb2.FileDescriptorProto(name="tb_subset.proto", package="tb", syntax="proto3")

  def message(name, *fields):
    m = fdp.message_type.add(name=name)
    for fname, number, ftype, repeated, type_name in fields:
      f = m.field.add(name=fname, number=number, type=ftype,
                      label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
      if type_name:
        f.type_name = f".tb.{type_name}"

  message("PluginData", ("plugin_name", 1, F.TYPE_STRING, False, None),
          ("content", 2, F.TYPE_BYTES, False, None))
  message("SummaryMetadata", ("plugin_data", 1, F.TYPE_MESSAGE, False, "PluginData"))
  message("TensorShapeProto")
  message("TensorProto", ("dtype", 1, F.TYPE_INT32, False, None),
          ("tensor_shape", 2, F.TYPE_MESSAGE, False, "TensorShapeProto"),
          ("string_val", 8, F.TYPE_BYTES, True, None))
  message("Image", ("height", 1, F.TYPE_INT32, False, None), ("width", 2, F.TYPE_INT32, False, None),
          ("colorspace", 3, F.TYPE_INT32, False, None),
          ("encoded_image_string", 4, F.TYPE_BYTES, False, None))
  message("Value", ("tag", 1, F.TYPE_STRING, False, None),
          ("simple_value", 2, F.TYPE_FLOAT, False, None),
          ("image", 4, F.TYPE_MESSAGE, False, "Image"),
          ("node_name", 7, F.TYPE_STRING, False, None),
          ("tensor", 8, F.TYPE_MESSAGE, False, "TensorProto"),
          ("metadata", 9, F.TYPE_MESSAGE, False, "SummaryMetadata"))
  message("Summary", ("value", 1, F.TYPE_MESSAGE, True, "Value"))
  message("SessionLog", ("status", 1, F.TYPE_INT32, False, None),
          ("checkpoint_path", 2, F.TYPE_STRING, False, None))
  message("Event", ("wall_time", 1, F.TYPE_DOUBLE, False, None),
          ("step", 2, F.TYPE_INT64, False, None),
          ("file_version", 3, F.TYPE_STRING, False, None),
          ("graph_def", 4, F.TYPE_BYTES, False, None),
          ("summary", 5, F.TYPE_MESSAGE, False, "Summary"),
          ("session_log", 7, F.TYPE_MESSAGE, False, "SessionLog"))
  pool = descriptor_pool.DescriptorPool()
  pool.Add(fdp)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tb.Event"))


def test_event_file_parses_with_the_protobuf_library(tmp_path):
  """The hand-written encoding, read by an independent decoder (google.protobuf)."""
  image = np.zeros((5, 7, 3), np.uint8)
  image[1, 2] = (255, 10, 20)
  w = events_lib.EventFileWriter(tmp_path)
  w.session_start(11)
  w.scalars(12, {"loss": 0.25, "rollout/reward": -3.5})
  w.images(300, {"rollouts/00": image})
  w.texts(2**40, {"notes": "héllo **world**"})
  w.close()
  Event = _event_class()
  events = []
  with open(w.path, "rb") as f:
    for rec in events_lib.read_records(f.read()):
      ev = Event()
      ev.ParseFromString(rec)
      events.append(ev)
  assert len(events) == 5
  assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 1e9
  assert events[1].step == 11 and events[1].session_log.status == 1  # START
  assert events[2].step == 12
  assert {v.tag: v.simple_value for v in events[2].summary.value} == {"loss": 0.25, "rollout/reward": -3.5}
  img = events[3].summary.value[0]
  assert events[3].step == 300 and img.tag == "rollouts/00"
  assert (img.image.height, img.image.width, img.image.colorspace) == (5, 7, 3)
  decoded = np.asarray(Image.open(io.BytesIO(img.image.encoded_image_string)))
  np.testing.assert_array_equal(decoded, image)
  text = events[4].summary.value[0]
  assert events[4].step == 2**40 and text.tag == "notes"
  assert text.metadata.plugin_data.plugin_name == "text" and text.tensor.dtype == 7  # DT_STRING
  assert [s.decode("utf-8") for s in text.tensor.string_val] == ["héllo **world**"]
  assert text.tensor.HasField("tensor_shape") and not text.tensor.tensor_shape.ListFields()


def test_read_events_round_trip(tmp_path):
  w = events_lib.EventFileWriter(tmp_path)
  w.scalars(-1, {"a": 1.0 / 3.0})
  w.images(2, {"gray": np.full((3, 4), 0.5, np.float32), "pil": Image.new("RGBA", (6, 2), "red")})
  w.close()
  events = events_lib.read_events(tmp_path)
  assert [e.step for e in events] == [0, -1, 2]
  assert events[1].scalars["a"] == pytest.approx(1 / 3, rel=1e-7)
  h, wd, png = events[2].images["gray"]
  assert (h, wd) == (3, 4) and np.asarray(Image.open(io.BytesIO(png))).max() == 128
  assert events[2].images["pil"][:2] == (2, 6)


def test_bad_images_are_rejected(tmp_path):
  w = events_lib.EventFileWriter(tmp_path)
  with pytest.raises(ValueError, match="image 'x'"):
    w.images(0, {"x": np.zeros((2, 3, 5), np.uint8)})
  with pytest.raises(ValueError, match="uint8 or float"):
    w.images(0, {"x": np.zeros((2, 3), np.int64)})


# ------------------------------------------------------------------------------------------------
# MetricsWriter.
# ------------------------------------------------------------------------------------------------


def test_writes_one_json_object_per_step(tmp_path):
  with metrics.MetricsWriter(tmp_path, is_primary=True) as w:
    w.write_scalars(1, {"loss": jnp.float32(0.5), "rollout/reward": np.float64(0.25),
                        "num_tokens": np.int32(7), "valid": True, "bad": float("nan")})
    w.write_scalars(2, {"loss": jnp.asarray([1.5])})
  assert _lines(tmp_path) == [
      {"step": 1, "loss": 0.5, "rollout/reward": 0.25, "num_tokens": 7, "valid": 1, "bad": None},
      {"step": 2, "loss": 1.5},
  ]
  assert metrics.read_metrics(tmp_path) == _lines(tmp_path)
  events = events_lib.read_events(os.path.join(tmp_path, metrics.TENSORBOARD_DIR))
  scalars = {e.step: e.scalars for e in events if e.scalars}
  assert scalars[1]["rollout/reward"] == 0.25 and np.isnan(scalars[1]["bad"])
  assert scalars[2] == {"loss": 1.5}


def test_rejects_bad_scalars_and_steps(tmp_path):
  with metrics.MetricsWriter(tmp_path, is_primary=True) as w:
    with pytest.raises(ValueError, match="'loss' must be a scalar"):
      w.write_scalars(1, {"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="other than 'step'"):
      w.write_scalars(1, {"step": 3})
    w.write_scalars(5, {"a": 1})
    with pytest.raises(ValueError, match="step 5 after step 5"):
      w.write_scalars(5, {"b": 1})
    with pytest.raises(ValueError, match="step 4 after step 5"):
      w.write_scalars(4, {"b": 1})
  with pytest.raises(ValueError, match="closed"):
    w.write_scalars(6, {"a": 1})


def test_resume_truncates_steps_after_the_checkpoint(tmp_path):
  # A run logs steps 1..5, checkpoints at step 3, and is killed while writing step 6.
  with metrics.MetricsWriter(tmp_path, is_primary=True) as w:
    for step in range(1, 6):
      w.write_scalars(step, {"loss": float(step)})
  with open(os.path.join(tmp_path, metrics.METRICS_FILE), "a") as f:
    f.write('{"step": 6, "lo')
  # The restarted run resumes at step 3 and logs steps 4..6 again.
  with metrics.MetricsWriter(tmp_path, is_primary=True, start_step=3) as w:
    assert w.last_step == 3
    for step in range(4, 7):
      w.write_scalars(step, {"loss": step * 10.0})
  assert [(e["step"], e["loss"]) for e in _lines(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
  # The second event file tells TensorBoard to drop the first run's points from step 4 on.
  second = events_lib.read_events(_event_files(tmp_path)[-1])
  assert second[1].session_start and second[1].step == 4
  # A fresh start (no checkpoint) drops everything.
  with metrics.MetricsWriter(tmp_path, is_primary=True, start_step=0) as w:
    assert w.last_step is None
  assert _lines(tmp_path) == []


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
  with open(os.path.join(tmp_path, metrics.METRICS_FILE), "w") as f:
    f.write('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics line"):
    metrics.MetricsWriter(tmp_path, is_primary=True, start_step=2)


def test_non_primary_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricsWriter(workdir, is_primary=False, total_steps=3) as w:
    w.write_scalars(1, {"loss": 1.0})
    w.write_images(1, {"x": np.zeros((2, 2), np.uint8)})
    w.write_texts(1, {"t": "x"})
  assert not workdir.exists()


def test_progress_bar_shows_the_key_numbers(tmp_path):
  stream = io.StringIO()
  with metrics.MetricsWriter(tmp_path, is_primary=True, start_step=2, total_steps=10,
                             progress_stream=stream) as w:
    w.write_scalars(3, {"rollout/reward_mean": 0.625, "train/loss": 0.0123, "other": 99.0})
  out = stream.getvalue()
  assert "3/10" in out
  assert "reward_mean=0.625" in out and "loss=0.0123" in out and "other" not in out


def test_remote_paths_rewrite_whole_objects(tmp_path, monkeypatch):
  """gs:// cannot append: the writer keeps the content and rewrites the object (here on disk)."""
  monkeypatch.setattr(paths, "is_remote", lambda path: True)
  with metrics.MetricsWriter(str(tmp_path), is_primary=True) as w:
    for step in (1, 2, 3):
      w.write_scalars(step, {"x": step})
  with metrics.MetricsWriter(str(tmp_path), is_primary=True, start_step=2) as w:
    w.write_scalars(3, {"x": 30})
    w.write_images(3, {"i": np.zeros((2, 2), np.uint8)})
  assert [(e["step"], e["x"]) for e in _lines(tmp_path)] == [(1, 1), (2, 2), (3, 30)]
  last = events_lib.read_events(_event_files(tmp_path)[-1])
  assert [e.step for e in last] == [0, 3, 3, 3] and last[2].scalars == {"x": 30.0}
