"""tools/convert_weights.py: bit-exact HF -> JAX -> HF, transformers loads and generates, clear errors."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import hf_reference as R
from mgpo_jax.io import checkpoint as ckpt_io
from mgpo_jax.models.qwen2_5_vl import checkpoint
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import safetensors_io as sio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "convert_weights.py")
_spec = importlib.util.spec_from_file_location("convert_weights", TOOL)
convert_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(convert_weights)


def convert(*argv):
  """In-process CLI call -> exit status (argparse errors exit via SystemExit)."""
  try:
    return convert_weights.main([str(a) for a in argv])
  except SystemExit as e:
    return e.code


def cli(*argv):
  """The tool as a user runs it: a fresh process."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, TOOL, *map(str, argv)], capture_output=True, text=True, cwd=REPO,
                        env=env, timeout=300)


def tensors_by_key(hf_dir):
  """canonical key -> (dtype, shape, raw bytes)."""
  out = {}
  for key, sf in sio.open_dir(hf_dir).items():
    out[params_lib.canonical_key(key)] = (sf.dtype(key), sf.shape(key), sf.read(key).tobytes())
  return out


def assert_nothing_left(dst):
  assert not os.path.exists(dst), os.listdir(dst)
  siblings = glob.glob(os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-*"))
  assert not siblings, siblings


# ----------------------------------------------------------------------------- bit-exact round trip
@pytest.fixture(scope="module")
def refs(ref_untied, ref_tied, tmp_path_factory):
  d = tmp_path_factory.mktemp("refs_bf16")
  R.build_reference(d / "untied", seed=5, dtype=torch.bfloat16)
  R.build_reference(d / "tied", seed=6, dtype=torch.bfloat16, tie=True)
  return {"f32-untied": ref_untied[0], "f32-tied": ref_tied[0],
          "bf16-untied": str(d / "untied"), "bf16-tied": str(d / "tied")}


@pytest.mark.parametrize("name,shard", [("f32-untied", "5GB"), ("f32-tied", "60KB"), ("bf16-untied", "40KB"),
                                        ("bf16-tied", "5GB")])
def test_round_trip_is_bit_exact(refs, tmp_path, name, shard):
  src = refs[name]
  assert convert("--direction=hf_to_jax", f"--src={src}", f"--dst={tmp_path / 'ckpt'}", "--no_progress") == 0
  out = tmp_path / "hf"
  assert convert("--direction=jax_to_hf", f"--src={tmp_path / 'ckpt'}", f"--dst={out}",
                 f"--max_shard_size={shard}", "--no_progress") == 0
  a, b = tensors_by_key(src), tensors_by_key(out)
  assert sorted(a) == sorted(b)
  assert ("lm_head.weight" in b) == ("untied" in name)
  for key in a:
    assert a[key][:2] == b[key][:2], key          # dtype, shape
    assert a[key][2] == b[key][2], key            # identical bytes
  # File layout: released flat keys, sharded files named like the releases, a consistent index.
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(set(index["weight_map"].values()))
  assert files == sorted(os.path.basename(f) for f in glob.glob(str(out / "*.safetensors")))
  n = len(files)
  assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  assert (n == 1) == (shard == "5GB")
  assert set(index["weight_map"]) == set(b)
  assert index["metadata"]["total_size"] == sum(len(v[2]) for v in b.values())
  for f in files:
    sf = sio.SafetensorsFile(out / f)
    assert sf.metadata == {"format": "pt"}
    tensor_bytes = [len(b[k][2]) for k in sf.keys()]
    assert sum(tensor_bytes) <= checkpoint.parse_size(shard) or len(tensor_bytes) == 1
  # config.json is the source's, verbatim (same dtype).
  assert json.loads((out / "config.json").read_text()) == json.loads(open(os.path.join(src, "config.json")).read())
  assert not glob.glob(str(tmp_path / ".*"))  # no temporary siblings left


# ----------------------------------------------------------------------------- transformers loads it
@pytest.fixture(scope="module")
def src_with_assets(ref_untied, tmp_path_factory):
  """The untied reference plus a tokenizer, a chat template, an image-processor config, generation config."""
  from mgpo_jax.models.qwen2_5_vl import tokenizer as tok_lib
  d = tmp_path_factory.mktemp("src_assets") / "hf"
  shutil.copytree(ref_untied[0], d)
  tok_lib.build_tokenizer(d, vocab_size=300)
  (d / "preprocessor_config.json").write_text(json.dumps(
      {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2,
       "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056}))
  (d / "README.md").write_text("not an asset")
  return str(d), ref_untied[1]


def test_exported_dir_loads_and_generates_like_the_original(src_with_assets, tmp_path):
  from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
  src, ref = src_with_assets
  ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
  assert convert("--direction=hf_to_jax", f"--src={src}", f"--dst={ckpt}", "--no_progress") == 0
  assert convert("--direction=jax_to_hf", f"--src={ckpt}", f"--dst={out}", "--max_shard_size=100KB",
                 "--no_progress") == 0
  assert len(glob.glob(str(out / "model-*.safetensors"))) > 1
  # Assets travel along byte for byte; other files do not.
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
               "generation_config.json"):
    assert (out / name).read_bytes() == open(os.path.join(src, name), "rb").read(), name
  assert not (out / "README.md").exists()

  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), attn_implementation="eager").eval()
  ref_sd, sd = ref.state_dict(), model.state_dict()
  assert sorted(ref_sd) == sorted(sd)
  for k in ref_sd:
    assert torch.equal(ref_sd[k], sd[k]), k
  # Greedy generation gives the same tokens (HF generate on both).
  ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
  kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
  with torch.no_grad():
    a, b = ref.generate(ids, **kw), model.generate(ids, **kw)
  assert a.shape[1] > ids.shape[1]
  assert torch.equal(a, b)
  # Vision weights too: identical logits on an image prompt.
  rng = np.random.default_rng(0)
  grids = [(1, 8, 12)]
  img_ids = np.array([R.image_prompt(grids)])
  pv = R.random_pixels(grids, rng)
  np.testing.assert_array_equal(R.hf_logits(ref, img_ids, None, pv, np.array(grids)),
                                R.hf_logits(model, img_ids, None, pv, np.array(grids)))
  tok, src_tok = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(src)
  text = "What is the color of the cat? <|im_end|>"
  assert tok.encode(text) == src_tok.encode(text)
  assert tok.chat_template == src_tok.chat_template is not None


def test_export_with_dtype_casts_like_torch(src_with_assets, tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration
  src, ref = src_with_assets
  assert convert("--direction=hf_to_jax", f"--src={src}", f"--dst={tmp_path / 'ckpt'}", "--no_progress") == 0
  out = tmp_path / "hf"
  assert convert("--direction=jax_to_hf", f"--src={tmp_path / 'ckpt'}", f"--dst={out}", "--dtype=bfloat16",
                 "--no_progress") == 0
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["dtype"] == "bfloat16"
  model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out))
  assert model.dtype == torch.bfloat16
  for k, v in ref.state_dict().items():  # numpy's round-to-nearest-even == torch's cast, bit for bit
    assert torch.equal(v.to(torch.bfloat16), model.state_dict()[k]), k


def test_import_with_dtype_then_export_matches_torch_cast(refs, tmp_path):
  src = refs["f32-tied"]
  assert convert("--direction=hf_to_jax", f"--src={src}", f"--dst={tmp_path / 'ckpt'}", "--dtype=bfloat16",
                 "--no_progress") == 0
  assert convert("--direction=jax_to_hf", f"--src={tmp_path / 'ckpt'}", f"--dst={tmp_path / 'hf'}",
                 "--no_progress") == 0
  a = sio.open_dir(src)
  for key, sf in sio.open_dir(tmp_path / "hf").items():
    want = torch.from_numpy(a[key].read(key).copy()).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(sf.read(key).view(np.int16), want, err_msg=key)


def test_relative_paths(refs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  shutil.copytree(refs["bf16-tied"], "src")
  assert convert("--direction=hf_to_jax", "--src=src", "--dst=ckpt", "--no_progress") == 0
  assert convert("--direction=jax_to_hf", "--src=ckpt", "--dst=out/hf", "--no_progress") == 0
  assert tensors_by_key("out/hf") == tensors_by_key("src")


# ----------------------------------------------------------------------------- errors: one line, nothing left
def one_line_error(stderr):
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and "Traceback" not in stderr, stderr
  assert lines[0].startswith("convert_weights: error: "), stderr
  return lines[0]


def test_cli_wrong_direction(tmp_path, refs):
  r = cli("--direction=hf2jax", f"--src={refs['f32-untied']}", f"--dst={tmp_path / 'out'}")
  assert r.returncode == 2
  assert "--direction" in one_line_error(r.stderr)
  assert_nothing_left(str(tmp_path / "out"))


def test_cli_missing_source_directory(tmp_path):
  r = cli("--direction=jax_to_hf", f"--src={tmp_path / 'nope'}", f"--dst={tmp_path / 'out'}")
  assert r.returncode == 1
  assert "does not exist" in one_line_error(r.stderr)
  assert_nothing_left(str(tmp_path / "out"))


def test_cli_truncated_safetensors(refs, tmp_path):
  src = tmp_path / "src"
  shutil.copytree(refs["f32-untied"], src)
  f = src / "model.safetensors"
  with open(f, "r+b") as fh:
    fh.truncate(f.stat().st_size - 1000)
  r = cli("--direction=hf_to_jax", f"--src={src}", f"--dst={tmp_path / 'out'}")
  assert r.returncode == 1
  assert "truncated" in one_line_error(r.stderr)
  assert_nothing_left(str(tmp_path / "out"))


def rewrite(src_dir, dst_dir, edit):
  """Copy an HF dir, passing its tensors through `edit(dict) -> dict` (insertion order kept)."""
  shutil.copytree(src_dir, dst_dir)
  f = os.path.join(dst_dir, "model.safetensors")
  sf = sio.SafetensorsFile(f)
  tensors = {k: sf.read(k) for k in sf.keys()}
  sio.write_file(f, edit(tensors), metadata={"format": "pt"})


def run_failing(capsys, *argv):
  capsys.readouterr()  # drop earlier output
  assert convert(*argv) != 0
  return one_line_error(capsys.readouterr().err)


def test_corrupt_header(refs, tmp_path, capsys):
  src = tmp_path / "src"
  shutil.copytree(refs["f32-untied"], src)
  data = bytearray((src / "model.safetensors").read_bytes())
  data[8:40] = b"\xff" * 32  # garbage in the JSON header
  (src / "model.safetensors").write_bytes(bytes(data))
  msg = run_failing(capsys, "--direction=hf_to_jax", f"--src={src}", f"--dst={tmp_path / 'out'}")
  assert "corrupt header" in msg
  assert_nothing_left(str(tmp_path / "out"))


def test_shape_mismatch_names_key_and_both_shapes(refs, tmp_path, capsys):
  key = "model.layers.1.mlp.up_proj.weight"
  rewrite(refs["f32-untied"], tmp_path / "src", lambda t: {**t, key: t[key][:95]})
  msg = run_failing(capsys, "--direction=hf_to_jax", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'out'}")
  assert key in msg and "(95, 64)" in msg and "(96, 64)" in msg
  assert_nothing_left(str(tmp_path / "out"))


def test_missing_tensor(refs, tmp_path, capsys):
  key = "visual.blocks.2.attn.qkv.bias"
  rewrite(refs["f32-untied"], tmp_path / "src", lambda t: {k: v for k, v in t.items() if k != key})
  msg = run_failing(capsys, "--direction=hf_to_jax", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'out'}")
  assert "missing" in msg and key in msg
  assert_nothing_left(str(tmp_path / "out"))


def test_unknown_tensor_is_an_error_unless_skipped(refs, tmp_path, capsys, caplog):
  key = "model.layers.0.self_attn.rotary_emb.inv_freq"
  extra = np.arange(8, dtype=np.float32)
  rewrite(refs["f32-untied"], tmp_path / "src", lambda t: {**t, key: extra})
  msg = run_failing(capsys, "--direction=hf_to_jax", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'out'}")
  assert "unexpected" in msg and key in msg
  assert_nothing_left(str(tmp_path / "out"))
  assert convert("--direction=hf_to_jax", f"--src={tmp_path / 'src'}", f"--dst={tmp_path / 'out'}",
                 "--skip_unknown", "--no_progress") == 0
  assert key in caplog.text and "skipping" in caplog.text
  assert convert("--direction=jax_to_hf", f"--src={tmp_path / 'out'}", f"--dst={tmp_path / 'hf'}",
                 "--no_progress") == 0
  assert tensors_by_key(tmp_path / "hf") == tensors_by_key(refs["f32-untied"])


def test_existing_destination_is_left_alone(refs, tmp_path, capsys):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  msg = run_failing(capsys, "--direction=hf_to_jax", f"--src={refs['f32-untied']}", f"--dst={dst}")
  assert "already exists" in msg
  assert os.listdir(dst) == ["keep.txt"]
  assert convert("--direction=hf_to_jax", f"--src={refs['f32-untied']}", f"--dst={dst}", "--overwrite",
                 "--no_progress") == 0
  assert sorted(os.listdir(dst)) == ["0", "hf_assets", "hf_config.json"]


def test_jax_to_hf_errors(refs, tmp_path, capsys):
  ckpt = tmp_path / "ckpt"
  assert convert("--direction=hf_to_jax", f"--src={refs['f32-untied']}", f"--dst={ckpt}", "--no_progress") == 0
  out = str(tmp_path / "out")
  # An HF directory is not a checkpoint.
  assert "not an mgpo_jax checkpoint" in run_failing(capsys, "--direction=jax_to_hf", f"--src={refs['f32-untied']}",
                                                     f"--dst={out}")
  assert "step 7 not found" in run_failing(capsys, "--direction=jax_to_hf", f"--src={ckpt}", "--step=7",
                                           f"--dst={out}")
  assert "invalid size" in run_failing(capsys, "--direction=jax_to_hf", f"--src={ckpt}", f"--dst={out}",
                                       "--max_shard_size=lots")
  assert "only apply" in run_failing(capsys, "--direction=hf_to_jax", f"--src={refs['f32-untied']}",
                                     f"--dst={out}", "--step=3")
  assert_nothing_left(out)
  # A config that does not match the stored arrays: named parameter and both shapes.
  bad = tmp_path / "bad"
  shutil.copytree(ckpt, bad)
  cfg = json.loads((bad / "hf_config.json").read_text())
  cfg["text_config"]["intermediate_size"] = 80
  (bad / "hf_config.json").write_text(json.dumps(cfg))
  msg = run_failing(capsys, "--direction=jax_to_hf", f"--src={bad}", f"--dst={out}")
  assert "'down'" in msg and "(2, 96, 64)" in msg and "(2, 80, 64)" in msg
  assert_nothing_left(out)


def test_cli_corrupt_checkpoint_data(refs, tmp_path):
  ckpt = tmp_path / "ckpt"
  assert convert("--direction=hf_to_jax", f"--src={refs['f32-untied']}", f"--dst={ckpt}", "--no_progress") == 0
  data_files = [p for p in glob.glob(str(ckpt / "0" / "params" / "**" / "*"), recursive=True)
                if os.path.isfile(p) and os.sep + "d" + os.sep in p]
  assert data_files
  for p in data_files:
    with open(p, "r+b") as fh:
      fh.truncate(16)
  out = str(tmp_path / "out")
  r = cli("--direction=jax_to_hf", f"--src={ckpt}", f"--dst={out}")
  assert r.returncode == 1
  msg = one_line_error(r.stderr)
  assert "unreadable checkpoint" in msg and len(msg) < 600
  assert_nothing_left(out)


def test_failure_midway_through_writing_leaves_nothing(refs, tmp_path, capsys, monkeypatch):
  ckpt = tmp_path / "ckpt"
  assert convert("--direction=hf_to_jax", f"--src={refs['f32-untied']}", f"--dst={ckpt}", "--no_progress") == 0
  out = str(tmp_path / "out")
  real_read, written = ckpt_io.read_param, []

  def flaky_read(pdir, path, dtype=None):
    if path == ("visual", "qkv"):  # by now several shards are on disk in the temporary sibling
      written.extend(glob.glob(os.path.join(tmp_path, ".out.tmp-*", "model-*.safetensors")))
      raise OSError("disk on fire")
    return real_read(pdir, path, dtype)

  monkeypatch.setattr(ckpt_io, "read_param", flaky_read)
  msg = run_failing(capsys, "--direction=jax_to_hf", f"--src={ckpt}", f"--dst={out}", "--max_shard_size=20KB")
  assert "disk on fire" in msg
  assert len(written) > 1
  assert_nothing_left(out)
