"""Config parsing, checkpoint loading errors, and building the model directly sharded on a mesh."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import hf_reference as R
from mgpo_jax.models import qwen2_5_vl
from mgpo_jax.models.qwen2_5_vl import safetensors_io
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig, UnsupportedConfigError

RELEASED_7B_STYLE = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "eos_token_id": 151645, "bos_token_id": 151643,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2, "hidden_act": "silu"},
}


def test_config_released_spelling():
  cfg = Qwen25VLConfig.from_hf_dict(RELEASED_7B_STYLE)
  assert cfg == Qwen25VLConfig.qwen2_5_vl_7b()
  assert cfg.head_dim == 128 and cfg.vision.head_dim == 80 and cfg.vision.patch_dim == 1176


def test_config_new_spelling_nested_text_config_and_in_channels():
  d = {k: v for k, v in RELEASED_7B_STYLE.items() if k not in ("rope_scaling", "rope_theta")}
  text = {k: d.pop(k) for k in ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "rms_norm_eps", "vocab_size"]}
  text["rope_parameters"] = {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}
  d["text_config"] = text
  d["vision_config"] = {**d["vision_config"], "in_channels": 3}
  del d["vision_config"]["in_chans"]
  assert Qwen25VLConfig.from_hf_dict(d) == Qwen25VLConfig.qwen2_5_vl_7b()


def test_config_round_trips_through_transformers(tmp_path):
  from transformers import AutoConfig
  for cfg in [Qwen25VLConfig.qwen2_5_vl_3b(), Qwen25VLConfig.qwen2_5_vl_7b()]:
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.text_config.num_hidden_layers == cfg.num_layers
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings
    assert hf.vision_config.out_hidden_size == cfg.vision.out_hidden_size
    hf.save_pretrained(tmp_path)  # transformers' own (newer) spelling reads back identically
    assert Qwen25VLConfig.from_pretrained(tmp_path) == cfg


@pytest.mark.parametrize("change, match", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope type"),
    ({"use_sliding_window": True}, "sliding"),
    ({"model_type": "llava"}, "not Qwen2.5-VL"),
    ({"num_attention_heads": 27}, "divisible"),
    ({"hidden_act": "gelu"}, "silu"),
])
def test_unsupported_config_is_a_clear_error(change, match):
  with pytest.raises(UnsupportedConfigError, match=match):
    Qwen25VLConfig.from_hf_dict({**RELEASED_7B_STYLE, **change})


def _rewrite(src, dst, edit):
  """Copy an HF dir, rewriting its single safetensors file through `edit(dict) -> dict`."""
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  f = safetensors_io.SafetensorsFile(path)
  tensors = {k: np.array(f.get(k)) for k in f.keys()}
  del f
  safetensors_io.write_file(path, edit(tensors))


def test_missing_tensor_names_the_key(ref_untied, tmp_path):
  key = "model.layers.1.self_attn.k_proj.bias"
  _rewrite(ref_untied[0], tmp_path / "m", lambda t: {k: v for k, v in t.items() if k != key})
  with pytest.raises(qwen2_5_vl.CheckpointMismatchError, match=key.replace(".", r"\.")):
    qwen2_5_vl.from_pretrained(tmp_path / "m")


def test_mismatched_shape_names_key_and_both_shapes(ref_untied, tmp_path):
  key = "visual.blocks.2.mlp.up_proj.weight"
  _rewrite(ref_untied[0], tmp_path / "m", lambda t: {**t, key: t[key][:-1]})
  with pytest.raises(qwen2_5_vl.CheckpointMismatchError, match=r"up_proj.*\(47, 32\).*\(48, 32\)"):
    qwen2_5_vl.from_pretrained(tmp_path / "m")


def test_unknown_tensor_is_an_error_unless_allowed(ref_untied, tmp_path):
  _rewrite(ref_untied[0], tmp_path / "m", lambda t: {**t, "model.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(qwen2_5_vl.CheckpointMismatchError, match="model.extra.weight"):
    qwen2_5_vl.from_pretrained(tmp_path / "m")
  qwen2_5_vl.from_pretrained(tmp_path / "m", allow_unknown=True)


def test_new_key_layout_is_accepted(ref_untied, tmp_path):
  def rename(t):
    out = {}
    for k, v in t.items():
      k = k.replace("visual.", "model.visual.", 1) if k.startswith("visual.") else k
      k = k.replace("model.", "model.language_model.", 1) if k.startswith(("model.layers", "model.embed",
                                                                           "model.norm")) else k
      out[k] = v
    return out
  _rewrite(ref_untied[0], tmp_path / "m", rename)
  a = qwen2_5_vl.from_pretrained(tmp_path / "m")
  b = qwen2_5_vl.from_pretrained(ref_untied[0])
  ids = np.array([[5, 6, 7, 8]])
  np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))


def test_truncated_safetensors_is_a_clear_error(ref_untied, tmp_path):
  shutil.copytree(ref_untied[0], tmp_path / "m")
  path = tmp_path / "m" / "model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(safetensors_io.SafetensorsError, match="truncated"):
    qwen2_5_vl.from_pretrained(tmp_path / "m")


def test_more_image_pads_than_features_is_a_clear_error(ref_untied):
  model = qwen2_5_vl.from_pretrained(ref_untied[0])
  grids = [(1, 4, 4)]
  ids = np.array([R.image_prompt([(1, 4, 6)])])  # 6 pad tokens, 4 features
  with pytest.raises(ValueError, match="6 <\\|image_pad\\|> tokens.*4 features"):
    model(ids, pixel_values=R.random_pixels(grids, np.random.default_rng(0)), image_grid_thw=np.array(grids))
  with pytest.raises(ValueError, match="no pixel_values"):
    model(ids)


def test_built_directly_sharded_on_a_mesh(ref_untied):
  """8 simulated devices: params land sharded per the rules table and logits equal the unsharded ones."""
  code = textwrap.dedent(f"""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from mgpo_jax.parallel import sharding as shd
    from mgpo_jax.models import qwen2_5_vl
    assert jax.device_count() == 8
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12]] * 2)
    ref = np.asarray(qwen2_5_vl.from_pretrained({ref_untied[0]!r})(ids))
    for shape in [(2, 2, 2), (1, 4, 2), (1, 8, 1)]:
      mesh = shd.make_mesh(shape)
      m = qwen2_5_vl.from_pretrained({ref_untied[0]!r}, mesh=mesh)
      q = m.q[...]
      assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None), q.sharding.spec
      shard_shapes = {{s.data.shape for s in q.addressable_shards}}
      assert shard_shapes == {{(2, 64 // shape[1], 4 // shape[2], 16)}}, shard_shapes
      m2 = qwen2_5_vl.init_model(m.cfg, seed=0, mesh=mesh)
      assert m2.gate[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
      np.testing.assert_allclose(np.asarray(m(ids)), ref, atol=1e-5)
    print("OK")
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
