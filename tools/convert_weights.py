"""Convert Qwen2.5-VL weights between Hugging Face safetensors and mgpo_jax (Orbax) checkpoints.

  python tools/convert_weights.py --direction=hf_to_jax --src=HF_DIR --dst=CKPT_DIR [--dtype=bfloat16]
  python tools/convert_weights.py --direction=jax_to_hf --src=CKPT_DIR_or_TRAINER_WORKDIR [--step=N] \
      --dst=HF_DIR [--dtype=bfloat16] [--max_shard_size=5GB]

Flags (a public contract):
  --direction       hf_to_jax | jax_to_hf. Required.
  --src             hf_to_jax: an HF model directory (config.json + *.safetensors, single file or sharded
                    with model.safetensors.index.json; released flat or newer nested key layout).
                    jax_to_hf: a checkpoint root written by hf_to_jax or the trainer, or a trainer WORKDIR
                    (its `checkpoints/` folder is used).
  --dst             Output directory. Must not exist or be empty, unless --overwrite.
  --dtype           auto (default: keep the stored dtype) | bfloat16 | float32 | float16.
  --step            jax_to_hf only: the step to export (default: the latest).
  --max_shard_size  jax_to_hf only: bytes per safetensors file, e.g. 5GB (default, like the released
                    checkpoints), 500MB, 2GiB. A larger tensor gets a file of its own.
  --skip_unknown    hf_to_jax only: skip tensors the model does not use, with a warning listing them
                    (default: fail naming them).
  --overwrite       Replace a non-empty --dst.
  --no_progress     No progress bars.

Outputs. hf_to_jax: CKPT_DIR/{hf_config.json, hf_assets/, 0/params/} (see mgpo_jax/io/checkpoint.py), which
the trainer and `mgpo_jax.models.qwen2_5_vl.checkpoint.restore_params` read directly. jax_to_hf: config.json, model-0000k-of-0000n
.safetensors in the released flat key layout, model.safetensors.index.json, and the tokenizer /
processor / chat-template / generation-config files the source came with, so that
`Qwen2_5_VLForConditionalGeneration.from_pretrained(HF_DIR)` and `AutoTokenizer.from_pretrained(HF_DIR)`
work. HF -> JAX -> HF is bit-exact when --dtype keeps the stored dtype.

Output is written to a temporary sibling of --dst and renamed into place when complete. On an error
(missing directory, truncated or corrupt safetensors, missing/unknown/mis-shaped tensor, bad flag) the
tool prints one line `convert_weights: error: ...` on stderr, exits with status 1 (2 for bad flags), and
leaves nothing at --dst. Host memory stays near one copy of the weights in the target dtype.
JAX runs on CPU unless JAX_PLATFORMS is set (conversion is I/O bound and must not need accelerator memory).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys

PROG = "convert_weights"
DIRECTIONS = ("hf_to_jax", "jax_to_hf")
DTYPE_CHOICES = ("auto", "bfloat16", "float32", "float16")


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one readable line instead of usage + message
    sys.stderr.write(f"{PROG}: error: {message} (see --help)\n")
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--direction", required=True, choices=DIRECTIONS)
  p.add_argument("--src", required=True)
  p.add_argument("--dst", required=True)
  p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--max_shard_size", default=None)
  p.add_argument("--skip_unknown", action="store_true")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--no_progress", action="store_true")
  return p


def _one_line(e: BaseException) -> str:
  msg = " ".join(str(e).split()) or type(e).__name__
  if not isinstance(e, (ValueError, OSError)):
    msg = f"{type(e).__name__}: {msg}"
  return msg


def _quiet_unraisable(u) -> None:
  # After a failed read, TensorStore completes the other pending reads into Orbax's already closed asyncio
  # loop; Python would print that as a traceback under our one-line error. Nothing is lost by dropping it.
  if isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value):
    return
  sys.__unraisablehook__(u)


def _release_freed_buffers() -> None:
  """Make glibc give large freed buffers back to the OS at once.

  Conversion allocates and frees one host buffer per layer from several threads; with glibc's adaptive
  mmap threshold those land in per-thread heaps that are not returned, and peak RSS grows by hundreds of
  MB. A fixed 1 MiB threshold gives each large buffer its own mapping, unmapped when freed.
  """
  try:
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD
  except (OSError, AttributeError):  # not glibc: nothing to tune
    pass


def run(args: argparse.Namespace) -> None:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every step at INFO
  from mgpo_jax.models.qwen2_5_vl import checkpoint

  progress = not args.no_progress
  if args.direction == "hf_to_jax":
    checkpoint.import_hf(args.src, args.dst, dtype=args.dtype, allow_unknown=args.skip_unknown,
                         overwrite=args.overwrite, progress=progress)
  else:
    checkpoint.export_hf(args.src, args.dst, step=args.step, dtype=args.dtype,
                         max_shard_size=args.max_shard_size or "5GB", overwrite=args.overwrite, progress=progress)


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.direction == "hf_to_jax" and (args.step is not None or args.max_shard_size is not None):
    parser.error("--step and --max_shard_size only apply to --direction=jax_to_hf")
  if args.direction == "jax_to_hf" and args.skip_unknown:
    parser.error("--skip_unknown only applies to --direction=hf_to_jax")
  if not os.path.isdir(args.src):
    sys.stderr.write(f"{PROG}: error: source directory {args.src!r} does not exist\n")
    return 1
  logging.basicConfig(format=f"{PROG}: %(levelname)s: %(message)s", level=logging.WARNING)
  try:
    run(args)
  except KeyboardInterrupt:
    sys.stderr.write(f"{PROG}: interrupted; nothing written to {args.dst}\n")
    return 130
  except Exception as e:  # every failure is reported as one line; the output was already removed
    sys.stderr.write(f"{PROG}: error: {_one_line(e)}\n")
    return 1
  sys.stderr.write(f"{PROG}: wrote {args.dst}\n")
  return 0


if __name__ == "__main__":
  # Process-wide settings, so only for the command line (not when main() is called in-process).
  sys.unraisablehook = _quiet_unraisable  # the late callbacks may come at interpreter exit
  _release_freed_buffers()
  sys.exit(main())
