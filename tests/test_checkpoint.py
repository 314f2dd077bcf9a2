"""mgpo_jax/io/checkpoint.py and models/qwen2_5_vl/checkpoint.py: the params format shared by the trainer
and the converter."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import hf_reference as R
from mgpo_jax.io import checkpoint as ckpt_io
from mgpo_jax.models.qwen2_5_vl import checkpoint
from mgpo_jax.models.qwen2_5_vl import params as params_lib
from mgpo_jax.models.qwen2_5_vl import safetensors_io as sio
from mgpo_jax.models.qwen2_5_vl.config import Qwen25VLConfig

HF_CONFIG = R.tiny_hf_config().to_dict()
CFG = Qwen25VLConfig.from_hf_dict(HF_CONFIG)


def leaves(state):
  return ckpt_io.flatten(nnx.to_pure_dict(state))


def scaled(state, factor):
  return jax.tree.map(lambda x: x * factor, state)


@pytest.fixture(scope="module")
def model():
  return params_lib.init_model(CFG, seed=3)


def test_save_restore_round_trip(model, tmp_path):
  state = nnx.split(model)[1]
  step_dir = checkpoint.save_params(tmp_path / "root", state, HF_CONFIG, step=3)
  assert step_dir == str(tmp_path / "root" / "3")
  assert sorted(os.listdir(tmp_path / "root")) == ["3", ckpt_io.HF_CONFIG]
  assert os.path.isdir(os.path.join(step_dir, ckpt_io.PARAMS))
  assert ckpt_io.latest_step(tmp_path / "root") == 3
  cfg, hf_config, restored = checkpoint.restore_params(tmp_path / "root")
  assert cfg == CFG and hf_config == json.loads(json.dumps(HF_CONFIG))
  a, b = leaves(state), leaves(restored)
  assert sorted(a) == sorted(b)
  for k in a:
    assert b[k].dtype == a[k].dtype and np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k
  # A restored model computes exactly what the saved one did.
  ids = np.array([[3, 17, 42, 99, 7, 250]])
  again = checkpoint.restore_model(tmp_path / "root")
  np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(again(ids)))


def test_restore_casts_with_round_to_nearest_even(model, tmp_path):
  state = nnx.split(model)[1]
  # Exact ties between two bfloat16 values: truncation and round-half-up would pick the other one.
  ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-3 * (1 + 2**-8)], np.float32)
  embed = np.asarray(state["embed"][...]).copy()
  embed[0, :4] = ties
  state["embed"][...] = jnp.asarray(embed)
  checkpoint.save_params(tmp_path / "root", state, HF_CONFIG)
  _, _, bf16 = checkpoint.restore_params(tmp_path / "root", dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(bf16["embed"][0, :4]).astype(np.float32),
                                [1.0, 1 + 2**-6, -1.0, 2**-3])
  for k, v in leaves(state).items():
    got = leaves(bf16)[k]
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16),
                                  np.asarray(v).astype(ml_dtypes.bfloat16).view(np.uint16), err_msg=str(k))


def test_trainer_workdir_layout(model, tmp_path):
  """A trainer run: WORKDIR/checkpoints/<step>/{params, train_state}, its own CheckpointManager."""
  state = nnx.split(model)[1]
  root = tmp_path / "workdir" / ckpt_io.CHECKPOINTS_SUBDIR
  checkpoint.write_root(root, HF_CONFIG)
  mngr = ocp.CheckpointManager(
      root, item_handlers={ckpt_io.PARAMS: ckpt_io.params_handler(),
                           "train_state": ocp.StandardCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False))
  for step, factor in ((5, 1.0), (10, 2.0)):
    mngr.save(step, args=ocp.args.Composite(**{
        ckpt_io.PARAMS: ckpt_io.params_save_args(scaled(state, factor)),
        "train_state": ocp.args.StandardSave({"step": jnp.asarray(step), "lr": jnp.asarray(0.1)})}))
  mngr.wait_until_finished()
  # The trainer resumes through its own manager with `params_restore_args` (here cast to bfloat16).
  abstract = nnx.split(params_lib.abstract_model(CFG, jnp.bfloat16))[1]
  got = mngr.restore(10, args=ocp.args.Composite(**{
      ckpt_io.PARAMS: ckpt_io.params_restore_args(abstract), "train_state": ocp.args.StandardRestore()}))
  assert int(got["train_state"]["step"]) == 10
  assert got[ckpt_io.PARAMS]["q"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got[ckpt_io.PARAMS]["q"]),
                                (2.0 * np.asarray(state["q"][...])).astype(ml_dtypes.bfloat16))
  mngr.close()
  os.makedirs(root / "15.orbax-checkpoint-tmp-123" / ckpt_io.PARAMS)  # an interrupted save
  workdir = tmp_path / "workdir"
  assert ckpt_io.all_steps(workdir) == [5, 10]
  assert ckpt_io.latest_step(workdir) == 10
  _, _, latest = checkpoint.restore_params(workdir)
  _, _, five = checkpoint.restore_params(workdir, step=5)
  np.testing.assert_array_equal(np.asarray(latest["q"][...]), 2.0 * np.asarray(state["q"][...]))
  np.testing.assert_array_equal(np.asarray(five["q"][...]), np.asarray(state["q"][...]))
  # Export of step 5 == the HF tensors of the state that was saved (bit for bit).
  out = tmp_path / "hf"
  checkpoint.export_hf(workdir, out, step=5)
  files = sio.open_dir(out)
  want = dict(params_lib.iter_hf_tensors(state, CFG))
  assert sorted(files) == sorted(want)
  for key, arr in want.items():
    assert files[key].read(key).tobytes() == np.ascontiguousarray(arr).tobytes(), key
  with pytest.raises(ckpt_io.CheckpointError, match="step 7 not found.*\\[5, 10\\]"):
    checkpoint.restore_params(workdir, step=7)


def test_mismatches_are_named(model, tmp_path):
  state = nnx.split(model)[1]
  pure = nnx.to_pure_dict(state)
  del pure["visual"]["qkv_bias"]
  checkpoint.save_params(tmp_path / "missing", pure, HF_CONFIG)
  with pytest.raises(params_lib.CheckpointMismatchError, match="missing.*visual/qkv_bias"):
    checkpoint.restore_params(tmp_path / "missing")
  pure = nnx.to_pure_dict(state)
  pure["extra"] = jnp.zeros(3)
  checkpoint.save_params(tmp_path / "extra", pure, HF_CONFIG)
  with pytest.raises(params_lib.CheckpointMismatchError, match="unexpected.*extra"):
    checkpoint.restore_params(tmp_path / "extra")
  checkpoint.save_params(tmp_path / "shape", state, HF_CONFIG)
  other = {**HF_CONFIG, "vision_config": {**HF_CONFIG["vision_config"], "intermediate_size": 40}}
  checkpoint.write_root(tmp_path / "shape", other)
  want = r"'visual/down' has shape \(3, 48, 32\).*\(3, 40, 32\)"
  with pytest.raises(params_lib.CheckpointMismatchError, match=want):
    checkpoint.restore_params(tmp_path / "shape")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.restore_params(tmp_path / "nowhere")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ckpt_io.CheckpointError, match="not an mgpo_jax checkpoint"):
    checkpoint.restore_params(tmp_path / "empty")
  checkpoint.write_root(tmp_path / "nosteps", HF_CONFIG)
  with pytest.raises(ckpt_io.CheckpointError, match="no complete checkpoint step"):
    checkpoint.restore_params(tmp_path / "nosteps")
  with pytest.raises(ValueError, match="model_type"):
    checkpoint.write_root(tmp_path / "bad", {**HF_CONFIG, "model_type": "llama"})


def test_copy_assets_takes_only_tokenizer_processor_and_template_files(tmp_path):
  src = tmp_path / "src"
  os.makedirs(src / "additional_chat_templates")
  names = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
           "chat_template.json", "preprocessor_config.json", "generation_config.json", "special_tokens_map.json"]
  for n in names + ["config.json", "model.safetensors", "model.safetensors.index.json", "README.md",
                    "pytorch_model.bin"]:
    (src / n).write_text(n)
  (src / "additional_chat_templates" / "tool.jinja").write_text("t")
  copied = ckpt_io.copy_assets(src, tmp_path / "dst")
  assert sorted(copied) == sorted(names + ["additional_chat_templates"])
  assert sorted(os.listdir(tmp_path / "dst")) == sorted(copied)
  assert (tmp_path / "dst" / "additional_chat_templates" / "tool.jinja").read_text() == "t"
  assert ckpt_io.copy_assets(tmp_path / "dst" / "tokenizer.json", tmp_path / "x") == []
  assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("text,n", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30),
                                    ("1.5KB", 1500), ("1234", 1234), (77, 77), ("10 kib", 10240)])
def test_parse_size(text, n):
  assert checkpoint.parse_size(text) == n


@pytest.mark.parametrize("text", ["", "GB", "5 GBs", "-3", "0", "1e9"])
def test_parse_size_rejects(text):
  with pytest.raises(ValueError):
    checkpoint.parse_size(text)


def test_plan_shards_like_transformers():
  f32 = np.dtype(np.float32)
  specs = [("a", f32, (10,)), ("b", f32, (10,)), ("c", f32, (30,)), ("d", f32, (5,)), ("e", f32, (5,))]
  names = lambda shards: [[s[0] for s in sh] for sh in shards]
  assert names(checkpoint.plan_shards(specs, 80)) == [["a", "b"], ["c"], ["d", "e"]]
  assert names(checkpoint.plan_shards(specs, 10**9)) == [["a", "b", "c", "d", "e"]]
  assert names(checkpoint.plan_shards(specs, 1)) == [["a"], ["b"], ["c"], ["d"], ["e"]]


def test_export_config_sets_dtype_fields_only():
  released = {"model_type": "qwen2_5_vl", "torch_dtype": "bfloat16", "vision_config": {"torch_dtype": "bfloat16"}}
  out = checkpoint.export_config(released, np.dtype(np.float32))
  assert out == {"model_type": "qwen2_5_vl", "torch_dtype": "float32", "vision_config": {"torch_dtype": "float32"}}
  assert released["torch_dtype"] == "bfloat16"  # not mutated
  assert checkpoint.export_config({"model_type": "qwen2_5_vl"}, np.dtype(np.float32))["torch_dtype"] == "float32"


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import jax
    sys.path.insert(0, sys.argv[2])
    import hf_reference as R
    from mgpo_jax.models.qwen2_5_vl import checkpoint
    from mgpo_jax.parallel import sharding as shd
    assert jax.device_count() == 8, jax.devices()
    root = sys.argv[1]
    single = checkpoint.restore_model(root)
    mesh = shd.make_mesh((2, 2, 2))
    sharded = checkpoint.restore_model(root, mesh=mesh)
    rng = np.random.default_rng(0)
    grids = [(1, 8, 12)]
    ids = np.array([R.image_prompt(grids, rng=rng)] * 2)
    pv, grid = R.random_pixels(grids + grids, rng), np.array(grids + grids)
    a = np.asarray(single(ids, pixel_values=pv, image_grid_thw=grid))
    b = np.asarray(sharded(ids, pixel_values=pv, image_grid_thw=grid))
    def info(name):
      arr = getattr(sharded, name)[...]
      spec = list(arr.sharding.spec) + [None] * (arr.ndim - len(arr.sharding.spec))  # P(a) == P(a, None)
      return dict(spec=[None if s is None else str(s) for s in spec],
                  mesh=dict(arr.sharding.mesh.shape), shape=list(arr.shape),
                  shards=sorted({tuple(s.data.shape) for s in arr.addressable_shards}),
                  devices=len(arr.sharding.device_set),
                  equal=bool(np.array_equal(np.asarray(arr), np.asarray(getattr(single, name)[...]))))
    out = {name: info(name) for name in ("q", "embed", "lm_head", "down", "final_norm")}
    # Loading the HF files straight onto the mesh (layer by layer into donated buffers) agrees too.
    from mgpo_jax.models.qwen2_5_vl import params as params_lib
    direct = params_lib.from_pretrained(sys.argv[3], mesh=mesh)
    out["direct"] = {name: dict(same_sharding=getattr(direct, name)[...].sharding.is_equivalent_to(
                                    getattr(sharded, name)[...].sharding, getattr(sharded, name)[...].ndim),
                                equal=bool(np.array_equal(np.asarray(getattr(direct, name)[...]),
                                                          np.asarray(getattr(single, name)[...]))))
                     for name in ("q", "embed", "lm_head", "down", "final_norm")}
    out["max_abs_diff"] = float(np.abs(a - b).max())
    out["logit_scale"] = float(np.abs(a).max())
    print("RESULT " + json.dumps(out))
""")


def test_restore_onto_8_device_mesh(ref_untied, tmp_path):
  root = tmp_path / "ckpt"
  checkpoint.import_hf(ref_untied[0], root)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  r = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(root), tests_dir, ref_untied[0]],
                     capture_output=True, text=True, timeout=600, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  res = json.loads(r.stdout.split("RESULT ", 1)[1])
  # data=2, fsdp=2, tensor=2; `embed` -> fsdp, heads/mlp/vocab -> tensor (mgpo_jax.parallel.sharding.RULES).
  assert res["q"]["spec"] == [None, "fsdp", "tensor", None]
  assert res["q"]["shards"] == [[2, 32, 2, 16]]        # [L, D/2, N/2, H]: each device holds only its part
  assert res["embed"]["spec"] == ["tensor", "fsdp"] and res["embed"]["shards"] == [[150, 32]]
  assert res["lm_head"]["spec"] == ["fsdp", "tensor"] and res["lm_head"]["shards"] == [[32, 150]]
  assert res["down"]["spec"] == [None, "tensor", "fsdp"] and res["down"]["shards"] == [[2, 48, 32]]
  assert res["final_norm"]["shards"] == [[64]]          # replicated
  for name in ("q", "embed", "lm_head", "down", "final_norm"):
    assert res[name]["devices"] == 8 and res[name]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert res[name]["equal"], name
  assert res["max_abs_diff"] <= 1e-5 * max(1.0, res["logit_scale"]), res
  assert all(d["same_sharding"] and d["equal"] for d in res["direct"].values()), res["direct"]
