"""Every benchmark at the "smoke" size (tiny model, batch 1-2, one repeat): it runs, its JSON and Markdown
have the fields, and the sanity checks inside hold (same greedy tokens / same loss as transformers,
bit-identical preprocessing, reshard keeps the values)."""

import json
import math
import os

import pytest

from bench import common, flat_vision, host, reshard, rollout, shared_rollout, shared_update, train_step


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
  return str(tmp_path_factory.mktemp("bench_cache"))


def _load(out_dir, name):
  with open(os.path.join(out_dir, f"{name}.json")) as f:
    data = json.load(f)
  with open(os.path.join(out_dir, f"{name}.md")) as f:
    md = f.read()
  assert data["meta"]["machine"]["cpu_count"] >= 1 and "jax" in data["meta"]["machine"]
  assert md.startswith("# ") and "## Run" in md
  return data, md


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_rollout_smoke(tmp_path, cache_root):
  cfg = rollout.RolloutBenchConfig(size="smoke", batch_sizes=(2,), new_tokens=4, prompt_len=48, image_px=56,
                                   repeats=1, cache_root=cache_root)
  rollout.run(cfg, str(tmp_path))
  data, md = _load(tmp_path, "rollout")
  rows = data["sections"]["Throughput"]
  assert [r["batch"] for r in rows] == [2]
  for r in rows:
    for k in ("ours_tok_s", "theirs_tok_s", "speedup", "ours_decode_tok_s", "theirs_decode_tok_s",
              "ours_warmup_s", "theirs_warmup_s", "ours_prefill_s"):
      assert _positive(r[k]), (k, r[k])
    assert r["first_tokens_match"] is True  # same weights, greedy, float32: same tokens
  assert "| batch |" in md and "decode_speedup" in md


def test_train_step_smoke(tmp_path, cache_root):
  cfg = train_step.TrainBenchConfig(size="smoke", rows=2, seq=160, samples_per_prompt=2, repeats=1,
                                    cost_analysis=False, breakdown=False, cache_root=cache_root)
  train_step.run(cfg, str(tmp_path))
  data, md = _load(tmp_path, "train_step")
  (row,) = data["sections"]["Step time"]
  for k in ("ours_s", "theirs_s", "speedup", "model_tflop", "matmul_peak_gflop_s", "ours_mfu", "theirs_mfu"):
    assert _positive(row[k]), (k, row[k])
  assert row["ours_mfu"] < 1.5  # a measured peak that the model FLOPs exceed a lot would be a bug
  (best,) = data["sections"]["Fastest repeat (quiet-machine view)"]
  assert best["ours_min_s"] <= row["ours_s"] and best["theirs_min_s"] <= row["theirs_s"]
  (sanity,) = data["sections"]["Sanity (first step, same weights)"]
  assert sanity["loss_rel_diff"] < 1e-4 and sanity["grad_norm_rel_diff"] < 1e-3
  assert "MFU" in md


def test_host_smoke(tmp_path):
  cfg = host.HostBenchConfig(size="smoke", orig_px=(640, 480), min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28,
                             repeats=1, rollout_samples=1, num_generations=2, e2e_max_pixels=16 * 28 * 28)
  host.run(cfg, str(tmp_path))
  data, md = _load(tmp_path, "host")
  pieces = {r["piece"]: r for r in data["sections"]["Per sample (ms)"]}
  for k in ("after_turn_total", "decode", "parse_bbox", "crop", "preprocess_crop", "render_followup",
            "hf_pil_preprocess_crop"):
    assert _positive(pieces[k]["median_ms"]), k
  (cmp_,) = data["sections"]["Preprocessing vs transformers"]
  assert cmp_["pil_identical"] is True
  (share,) = data["sections"]["Share of rollout wall time"]
  assert share["valid_box_rate"] == 1.0  # the forced turn 1 took the crop path in every row
  assert 0 < share["between_turns_share"] < 1 and share["rows"] == 2
  assert "Share of rollout wall time" in md


def test_reshard_smoke(tmp_path):
  cfg = reshard.ReshardBenchConfig(size="smoke", batch=4, new_tokens=3, prompt_len=48, image_px=56, repeats=1)
  reshard.run(cfg, str(tmp_path))
  data, md = _load(tmp_path, "reshard")
  (summary,) = data["sections"]["Summary"]
  assert summary["values_identical"] is True and summary["greedy_tokens_identical"] is True
  (b,) = data["sections"]["Bytes per device"]
  # 'embed' is over fsdp=4 in training only: the sampler holds more per device, and gathers the rest.
  assert b["weights_per_device_tensor_parallel"] > b["weights_per_device_fsdp"] > 0
  assert b["reshard_bytes_in_per_device"] == pytest.approx(b["weights_per_device_tensor_parallel"] * 3 / 4)
  assert {r["method"] for r in data["sections"]["Reshard RULES -> SAMPLING_RULES"]} == {"device_put", "jit_identity"}
  assert data["meta"]["machine"]["simulated_devices"].startswith("8 x")


def test_markdown_table_formats():
  md = common.markdown_table([{"a": 1.23456, "b": True, "c": 1e-9}])
  assert md.splitlines()[0] == "| a | b | c |" and "1.235" in md and "yes" in md and "1.000e-09" in md


def test_flat_vision_smoke(tmp_path):
  out = flat_vision.run(images=3, side=8, repeats=1, out_dir=str(tmp_path))  # raises if the layouts' losses differ
  data, md = _load(tmp_path, "flat_vision")
  rows = {r["layout"]: r for r in data["sections"]["Step time"]}
  assert len(rows) == 3 and all(_positive(r["step s (median)"]) for r in rows.values())
  assert rows["packed rows (flattened, now)"]["vision rows x patches"] == "3x64"
  assert out["meta"]["images"] == 3


def test_shared_rollout_smoke(tmp_path):
  shared_rollout.run("smoke", prompts=2, generations=2, prompt_text=8, image_px=56, crop_px=28, turn1_tokens=3,
                     turn2_tokens=2, repeats=1, out_dir=str(tmp_path))  # raises if shared != per-row tokens
  data, md = _load(tmp_path, "shared_rollout")
  rows = {r["variant"]: r for r in data["sections"]["Rollout time"]}
  assert set(rows) == {"shared", "per row", "transformers"} and data["meta"]["same_tokens"] is True
  assert all(_positive(r["rollout s (median)"]) for r in rows.values())


def test_shared_update_smoke(tmp_path):
  shared_update.run("smoke", prompts=2, generations=2, prompt_text=8, image_px=56, crop_px=28, turn1_tokens=3,
                    turn2_tokens=2, repeats=1, out_dir=str(tmp_path))  # raises if shared != per-row loss
  data, md = _load(tmp_path, "shared_update")
  rows = {r["variant"]: r for r in data["sections"]["Update time and compiled memory"]}
  assert set(rows) == {"shared", "per row"} and data["meta"]["same_loss"] is True
  assert rows["shared"]["prefix slots"] == 2 and rows["per row"]["prefix slots"] == 4
  assert all(_positive(r["update s (median)"]) and r["temp MiB"] > 0 for r in rows.values())
