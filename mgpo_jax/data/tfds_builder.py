"""A TFDS builder that packs MGPO samples into ArrayRecord files, usable without TensorFlow.

Images are stored as their original encoded bytes (`Tensor(shape=(), dtype=object)`:
`tfds.features.Image` would need TensorFlow to encode), so building is cheap and the input pipeline
decodes lazily. Records are read back with random access (`as_data_source`), which is what Grain
wants:

  cfg = MgpoConfig(name="synth_v1", source=SourceKind.SYNTHETIC,
                   splits={"train": {"n": 1000, "seed": 0}, "test": {"n": 100, "seed": 1}})
  build(cfg, data_dir)
  source = load_data_source(data_dir, "synth_v1", "train")   # len(source), source[i]

The source of each split is read by `readers.READERS[cfg.source]` with that split's arguments, e.g.
`{"path": "train.jsonl"}` for JSONL, `{"root": ...}` for V* style, `{"path": ..., "image_root": ...}`
for MME-RealWorld style, `{"n": ..., "seed": ..., "config": SyntheticConfig(...)}` for synthetic.
Samples whose image file is missing at build time are skipped with one warning each.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Iterator, Mapping

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mgpo_jax.data import readers
from mgpo_jax.data import schema

logger = logging.getLogger(__name__)

BUILDER_NAME = "mgpo_dataset"
FILE_FORMAT = "array_record"


@dataclasses.dataclass(eq=False, kw_only=True)
class MgpoConfig(tfds.core.BuilderConfig):
  """Which source to read, and the reader arguments of each split.

  Attributes:
    source: the registered reader (`readers.SourceKind`).
    splits: split name -> keyword arguments of the reader.
  """

  source: readers.SourceKind = readers.SourceKind.SYNTHETIC
  splits: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.source = readers.SourceKind(self.source)
    if not self.splits:
      raise ValueError(f"MgpoConfig {self.name!r}: `splits` must name at least one split")


def _features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      schema.ID: tfds.features.Text(),
      schema.QUESTION: tfds.features.Text(),
      schema.CHOICES: tfds.features.Sequence(tfds.features.Text()),
      schema.ANSWER: tfds.features.Text(),
      schema.CATEGORY: tfds.features.Text(),
      schema.IMAGE: tfds.features.Tensor(shape=(), dtype=np.object_),
      schema.TARGET_BOX: tfds.features.Tensor(shape=(4,), dtype=np.int32),
      schema.OBJECT_BOXES: tfds.features.Tensor(shape=(schema.MAX_OBJECTS, 4), dtype=np.int32),
  })


def _example(sample: schema.Sample) -> dict[str, Any] | None:
  """The TFDS example of a sample, or None (logged) when its image file cannot be read."""
  if schema.IMAGE in sample:
    data = sample[schema.IMAGE]
  else:
    path = sample[schema.IMAGE_PATH]
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      logger.warning("skipping sample %s: cannot read image %s (%s)", sample[schema.ID], path, e.strerror or e)
      return None
  return {
      schema.ID: sample[schema.ID],
      schema.QUESTION: sample[schema.QUESTION],
      schema.CHOICES: list(sample[schema.CHOICES]),
      schema.ANSWER: sample[schema.ANSWER],
      schema.CATEGORY: sample[schema.CATEGORY],
      schema.IMAGE: data,
      schema.TARGET_BOX: np.asarray(sample.get(schema.TARGET_BOX, schema.NO_BOX), dtype=np.int32),
      schema.OBJECT_BOXES: _object_boxes(sample),
  }


def _object_boxes(sample: schema.Sample) -> np.ndarray:
  """The sample's object boxes as MAX_OBJECTS rows, padded with NO_BOX (TFDS shapes are static)."""
  out = np.tile(np.asarray(schema.NO_BOX, np.int32), (schema.MAX_OBJECTS, 1))
  boxes = sample.get(schema.OBJECT_BOXES) or []
  if len(boxes) > schema.MAX_OBJECTS:
    raise ValueError(f"sample {sample[schema.ID]}: {len(boxes)} object boxes, more than {schema.MAX_OBJECTS}")
  for i, b in enumerate(boxes):
    out[i] = b
  return out


class MgpoDataset(tfds.core.GeneratorBasedBuilder):
  """MGPO multiple-choice visual questions (see the module docstring)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release: encoded image bytes + question, choices, answer.",
                   "1.1.0": "object_boxes (the scenes' objects, for the random-crop control)."}

  # TFDS finds a builder's source file through `importlib_resources`, a backport that is not
  # installed here; point it at this file directly (it looks for a checksums file beside it).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, file_format: str = FILE_FORMAT, **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _create_builder_config(self, builder_config, version):
    # Our configs are made per run from the experiment config, by design never declared in
    # BUILDER_CONFIGS: TFDS would warn "Using custom data configuration" with the whole config each time.
    if isinstance(builder_config, MgpoConfig):
      return builder_config
    return super()._create_builder_config(builder_config, version)

  # TFDS prints "Downloading and preparing dataset ..." (nothing is downloaded: the source is local) and
  # "... downloaded and prepared" to stdout; the program logs its own line about the build instead.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="MGPO multiple-choice visual questions with encoded images.",
        features=_features(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {name: self._generate_examples(args) for name, args in self.builder_config.splits.items()}

  def _generate_examples(self, reader_args: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for sample in readers.read_source(self.builder_config.source, **reader_args):
      example = _example(sample)
      if example is not None:
        yield sample[schema.ID], example


def build(config: MgpoConfig, data_dir: str | os.PathLike) -> MgpoDataset:
  """Builds (or reuses, if already built) the dataset of `config` under `data_dir`."""
  if not sys.stderr.isatty():  # TFDS's bars redraw with \r and cursor codes: noise in a log file
    tfds.disable_progress_bar()
  builder = MgpoDataset(config=config, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
  )
  return builder


def dataset_dir(data_dir: str | os.PathLike, config_name: str, version: str | None = None) -> str:
  """Folder of a built config; the newest built version when `version` is None."""
  cfg_dir = os.path.join(os.fspath(data_dir), BUILDER_NAME, config_name)
  if version is None:
    versions = []
    if os.path.isdir(cfg_dir):
      for v in os.listdir(cfg_dir):
        try:
          versions.append((tfds.core.Version(v), v))
        except ValueError:
          continue  # e.g. "incomplete.*" folders of an interrupted build.
    if not versions:
      raise ValueError(f"no built dataset under {cfg_dir!r}; run `build` first")
    version = max(versions)[1]
  path = os.path.join(cfg_dir, version)
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise ValueError(f"{path!r} holds no built dataset (dataset_info.json is missing)")
  return path


def load_data_source(
    data_dir: str | os.PathLike, config_name: str, split: str, version: str | None = None
):
  """Random-access source (`len`, `[i]`) of a built split; needs neither TF nor the config."""
  builder = tfds.builder_from_directory(dataset_dir(data_dir, config_name, version))
  if split not in builder.info.splits:
    raise ValueError(f"split {split!r} not built for {config_name!r}; have {list(builder.info.splits)}")
  return builder.as_data_source(split)
