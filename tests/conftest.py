"""Shared fixtures: tiny random transformers reference models saved with `save_pretrained`."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ref_untied(tmp_path_factory):
  """(hf_dir, torch model): untied embeddings, released `rope_scaling` spelling, float32."""
  import hf_reference
  d = tmp_path_factory.mktemp("ref_untied")
  return str(d), hf_reference.build_reference(d, seed=0)


@pytest.fixture(scope="session")
def ref_tied(tmp_path_factory):
  """(hf_dir, torch model): tied embeddings (like 3B), newer `rope_parameters` spelling."""
  import hf_reference
  d = tmp_path_factory.mktemp("ref_tied")
  return str(d), hf_reference.build_reference(d, seed=1, tie=True, new_spelling=True)
