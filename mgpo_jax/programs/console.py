"""What a program prints besides its own lines: third-party notices silenced where they come from.

Imported first by the programs, because some notices are printed at import time:
- transformers says "PyTorch was not found ..." when it is imported without torch (our programs never
  need torch): its advisory warnings and its logger below errors are switched off by its own settings;
- Orbax and absl log every checkpoint step at INFO, TFDS its builder choices; those loggers are set to
  WARNING (their warnings still show).
"""

from __future__ import annotations

import logging
import os

# Read by transformers when it is first imported (before any of our modules import it).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

_NOISY = ("absl", "jax._src", "orbax", "tensorflow_datasets", "grain", "etils")


def quiet_third_party() -> None:
  """Third-party loggers to WARNING (call once absl has installed its handler, i.e. in `main`)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if absl_logging.get_verbosity() < absl_logging.DEBUG:  # -v 1 asks to see everything
    for name in _NOISY:
      logging.getLogger(name).setLevel(logging.WARNING)
