"""Grain input pipeline: shard -> shuffle -> repeat -> decode (guarded) -> batch, checkpointable.

  source (len, [i])                  a TFDS data source, a list of samples, ...
    .shuffle(seed)                   one global order (same seed everywhere), reshuffled every epoch
    .repeat(num_epochs)
    [shard_index::shard_count]       strided per-process shards (of equal size by default)
    .map(decode)                     Pillow decode; bad images -> None + one warning
    .to_iter_dataset(ReadOptions)    drops the Nones, reads ahead with threads
    [.mp_prefetch(workers)]
    .batch(batch_size, list)         a batch is a LIST of decoded samples (sizes differ)

The iterator's position is a small JSON-able dict (`get_state` / `set_state`); `save_args` /
`restore_args` wrap it for an Orbax `CheckpointManager`, so it is saved with the model:

  mngr.save(step, args=ocp.args.Composite(state=..., data=pipeline.save_args(it)))
  mngr.restore(step, args=ocp.args.Composite(state=..., data=pipeline.restore_args(it)))

Images are checked before decoding: the pixel count in the header must not exceed
`max_image_pixels` (a decompression-bomb guard). Pillow applies its own limit too
(2 * PIL.Image.MAX_IMAGE_PIXELS, about 179M pixels); images above it are rejected the same way.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from typing import Any, Mapping, Sequence

from absl import flags
import grain
import jax
from PIL import Image

from mgpo_jax.data import schema

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 100_000_000


@dataclasses.dataclass(frozen=True)
class DecodeImage:
  """Grain map step: record -> decoded sample, or None (logged once) when the image is unusable."""

  max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

  def __call__(self, record: Mapping[str, Any]) -> schema.DecodedSample | None:
    out = self.decode(record)
    if isinstance(out, str):
      return _reject(schema.normalize_sample(record)[schema.ID], out)
    return out

  def decode(self, record: Mapping[str, Any]) -> schema.DecodedSample | str:
    """The decoded sample, or why its image is unusable (not logged: `__call__` logs)."""
    sample = schema.normalize_sample(record)
    if schema.IMAGE in sample:
      fp, where = io.BytesIO(sample[schema.IMAGE]), "image bytes"
    else:
      where = sample[schema.IMAGE_PATH]
      try:
        fp = open(where, "rb")  # pylint: disable=consider-using-with
      except FileNotFoundError:
        return f"image file not found: {where}"
      except OSError as e:
        return f"cannot open image file {where}: {e.strerror or e}"
    with fp:
      try:
        img = Image.open(fp)  # Reads the header only.
      except Image.DecompressionBombError as e:
        return f"decompression-bomb guard (Pillow): {e}"
      except Image.UnidentifiedImageError:
        return f"unrecognised image format in {where}"
      except Exception as e:  # pylint: disable=broad-except
        # Decoders raise many types (OSError, SyntaxError, ValueError, ...); all mean "bad file".
        return f"unreadable {where} ({type(e).__name__}: {e})"
      w, h = img.size
      if w * h > self.max_image_pixels:
        return f"decompression-bomb guard: header says {w}x{h} = {w * h} pixels > {self.max_image_pixels}"
      try:
        rgb = img.convert("RGB")  # Decodes; truncated / corrupt data fails here.
      except Exception as e:  # pylint: disable=broad-except
        return f"corrupt or truncated image {where} ({type(e).__name__}: {e})"
    out: schema.DecodedSample = {**sample, schema.IMAGE: rgb}  # type: ignore[typeddict-item]
    return out


def _reject(sample_id: str, reason: str) -> None:
  logger.warning("skipping sample %s: %s", sample_id, reason)
  return None


def _is_present(x: Any) -> bool:
  return x is not None


def make_dataset(
    source: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    even_shards: bool = True,
    drop_remainder: bool = False,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    worker_count: int = 0,
    read_threads: int = 2,
    prefetch: int = 8,
) -> grain.IterDataset:
  """The batched, decoded, checkpointable dataset of one process.

  Args:
    source: random-access records in the sample schema (`len` + `[i]`).
    batch_size: samples per batch on THIS process.
    seed: shuffle seed (the same on every process; shards are disjoint anyway).
    shuffle: shuffle the shard (a new order each epoch).
    num_epochs: passes over the data; None repeats forever.
    shard_index: this process's shard; default `jax.process_index()`.
    shard_count: number of shards; default `jax.process_count()`.
    even_shards: drop the last `len(source) % shard_count` records so every process gets the same
      number (processes must agree on the number of steps).
    drop_remainder: drop a last, short batch.
    max_image_pixels: reject images whose header declares more pixels.
    worker_count: decode in this many worker processes (0: in this process).
    read_threads: threads reading and decoding ahead (0: synchronous).
    prefetch: records read ahead by those threads.

  Returns:
    An IterDataset of batches, each a list of `schema.DecodedSample`.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
  if max_image_pixels < 1:
    raise ValueError(f"max_image_pixels must be >= 1, got {max_image_pixels}")
  if shard_index is None or shard_count is None:
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}")

  ds = grain.MapDataset.source(source)
  if even_shards:
    ds = ds[: len(ds) - len(ds) % shard_count]
  if len(ds[shard_index::shard_count]) == 0:
    raise ValueError(f"shard {shard_index}/{shard_count} of a {len(source)}-record source is empty")
  if shuffle:
    ds = ds.shuffle(seed=seed)  # The same permutation on every process (same seed), new each epoch.
  # Strided shards of ONE global order: with batch b per process, the k-th batches of all processes
  # together are exactly the k-th batch of P*b records of a single-process run, so what a training
  # step sees does not depend on the number of hosts.
  ds = ds.repeat(num_epochs)[shard_index::shard_count]
  ds = ds.map(DecodeImage(max_image_pixels)).filter(_is_present)
  iter_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch if read_threads else 0)
  )
  if worker_count > 0:
    # grain 0.2.18's mp_prefetch reads an absl flag, which fails unless flags were parsed (true
    # under absl.app.run, not in scripts or tests). A later FLAGS(argv) still parses normally.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter_ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list)


def save_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax save args for the iterator's state (one JSON file per process)."""
  return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator) -> Any:
  """Orbax restore args: `restore` sets the state of `iterator` in place and returns it."""
  return grain.checkpoint.CheckpointRestore(iterator)
