"""Build + load round trips of the TFDS (ArrayRecord) builder, without TensorFlow."""

import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mgpo_jax.data import pipeline
from mgpo_jax.data import readers
from mgpo_jax.data import schema
from mgpo_jax.data import synthetic
from mgpo_jax.data import tfds_builder

SMALL = synthetic.SyntheticConfig(image_size=(96, 112), target_size=(10, 14))


def test_synthetic_build_and_load_round_trip(tmp_path):
  cfg = tfds_builder.MgpoConfig(
      name="synth_tiny",
      source=readers.SourceKind.SYNTHETIC,
      splits={"train": {"n": 5, "seed": 0, "config": SMALL}, "test": {"n": 2, "seed": 1, "config": SMALL}},
  )
  tfds_builder.build(cfg, tmp_path)
  files = os.listdir(tfds_builder.dataset_dir(tmp_path, "synth_tiny"))
  assert any(".array_record" in f for f in files)

  for split, n, seed in (("train", 5, 0), ("test", 2, 1)):
    source = tfds_builder.load_data_source(tmp_path, "synth_tiny", split)
    assert len(source) == n
    got = {s[schema.ID]: s for s in (schema.normalize_sample(source[i]) for i in range(n))}
    want = {s[schema.ID]: s for s in synthetic.generate_split(n, seed, SMALL)}
    assert got == want  # Same text fields, same image bytes, same target_box.

  # tfds' own entry point reads the same files.
  ds = tfds.data_source("mgpo_dataset/synth_tiny", split="test", data_dir=str(tmp_path), download=False)
  assert len(ds) == 2
  assert isinstance(ds[0][schema.IMAGE], bytes)


def test_jsonl_build_skips_missing_image_and_feeds_pipeline(tmp_path, caplog):
  samples = synthetic.generate_split(4, 3, SMALL)
  jsonl = tmp_path / "src" / "train.jsonl"
  jsonl.parent.mkdir()
  readers.write_jsonl(samples, jsonl)
  gone = samples[0][schema.ID]
  os.remove(jsonl.parent / "images" / f"{gone}.png")

  cfg = tfds_builder.MgpoConfig(name="from_jsonl", source="jsonl", splits={"train": {"path": str(jsonl)}})
  with caplog.at_level(logging.WARNING, logger="mgpo_jax.data.tfds_builder"):
    tfds_builder.build(cfg, tmp_path / "tfds")
  warnings = [r.getMessage() for r in caplog.records if r.name == "mgpo_jax.data.tfds_builder"]
  assert len(warnings) == 1 and gone in warnings[0] and "cannot read image" in warnings[0]

  source = tfds_builder.load_data_source(tmp_path / "tfds", "from_jsonl", "train")
  assert len(source) == 3
  rec = schema.normalize_sample(source[0])
  assert schema.IMAGE in rec and schema.IMAGE_PATH not in rec

  batches = list(pipeline.make_dataset(source, batch_size=2, seed=0, shuffle=False, shard_index=0, shard_count=1,
                                       even_shards=False))
  got = sorted(s[schema.ID] for b in batches for s in b)
  assert got == sorted(s[schema.ID] for s in samples[1:])
  by_id = {s[schema.ID]: s for s in samples}
  for b in batches:
    for s in b:
      assert s[schema.IMAGE].mode == "RGB"
      assert s[schema.TARGET_BOX] == by_id[s[schema.ID]][schema.TARGET_BOX]
      assert np.asarray(s[schema.IMAGE]).shape[:2] == s[schema.IMAGE].size[::-1]
  with pytest.raises(ValueError, match="split 'validation' not built"):
    tfds_builder.load_data_source(tmp_path / "tfds", "from_jsonl", "validation")


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match="no built dataset"):
    tfds_builder.load_data_source(tmp_path, "nothing", "train")
  with pytest.raises(ValueError, match="splits"):
    tfds_builder.MgpoConfig(name="empty", source="synthetic", splits={})
  with pytest.raises(ValueError):
    tfds_builder.MgpoConfig(name="bad", source="csv", splits={"train": {}})
