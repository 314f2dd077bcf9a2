"""Experiment files: a packaged config by name (`mgpo_jax/configs/<name>.py`) or any file with a
`get_config()` returning a `ConfigDict`."""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from mgpo_jax.config.fields import ConfigError

# The configs that ship with the package (the programs' `--config=<name>`).
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def packaged_configs() -> list[str]:
  """Names of the configs that ship with the package (`mgpo_jax/configs/<name>.py`)."""
  return sorted(f[:-3] for f in os.listdir(PACKAGED_DIR) if f.endswith(".py") and not f.startswith("_"))


def resolve_config_path(spec: str) -> str:
  """The experiment file `spec` names: an existing file, else a packaged config by name or by its old
  repository path (`configs/<name>.py`)."""
  if os.path.isfile(spec):
    return os.path.abspath(spec)
  head, tail = os.path.split(spec)
  name = tail[:-3] if tail.endswith(".py") else tail
  if head in ("", "configs") and name in packaged_configs():
    return os.path.join(PACKAGED_DIR, f"{name}.py")
  raise ConfigError(f"--config: {spec!r} is neither a file nor a packaged config "
                    f"(packaged: {', '.join(packaged_configs())})")


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of the experiment file at `path`."""
  module_name = "_mgpo_config_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception as e:  # the user's file: say where, in one line
    raise ConfigError(f"--config: {path}: {type(e).__name__}: {e}") from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"--config: {path}: get_config() returned {type(config).__name__}, not a ConfigDict")
  return config
