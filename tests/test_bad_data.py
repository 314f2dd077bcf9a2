"""A training set with a missing image, a corrupt JPEG and a 20000x20000 PNG trains on: each of the three
is skipped with one clear log line, the run finishes its steps."""

import io
import json
import os
import subprocess
import sys

from PIL import Image

from mgpo_jax.io import metrics as metrics_lib
from mgpo_jax.data import readers, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_training_skips_missing_corrupt_and_huge_images(tmp_path):
  data = tmp_path / "data"
  good = synthetic.generate_split(6, 5, synthetic.SyntheticConfig(image_size=(224, 448),
                                                             target_size=(8, 14)))
  readers.write_jsonl(good, data / "train.jsonl")
  jpeg = io.BytesIO()
  Image.new("RGB", (300, 200), (200, 30, 30)).save(jpeg, format="JPEG")
  (data / "images" / "corrupt.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 3])
  bomb = io.BytesIO()
  Image.new("1", (20000, 20000)).save(bomb, format="PNG")  # ~50 KB on disk, 400M pixels decoded
  (data / "images" / "huge.png").write_bytes(bomb.getvalue())
  base = {k: good[0][k] for k in ("question", "choices", "answer", "category")}
  with open(data / "train.jsonl", "a", encoding="utf-8") as f:
    for sid, path in (("bad-missing", "images/missing.jpg"), ("bad-corrupt", "images/corrupt.jpg"),
                      ("bad-huge", "images/huge.png")):
      f.write(json.dumps({**base, "id": sid, "image_path": path}) + "\n")

  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "mgpo_jax.main", f"--workdir={workdir}", "--config.data.source=jsonl",
       f"--config.data.path={data / 'train.jsonl'}", "--config.data.tfds_name=bad_images",
       "--config.train.num_steps=4", "--config.train.eval_every=0", "--config.train.eval_at_end=False",
       "--config.train.visualize_every=0", "--config.train.checkpoint_every=0"],
      cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3, 4]
  lines = proc.stderr.splitlines()
  for sid, why in (("bad-missing", "missing.jpg"), ("bad-corrupt", "corrupt"), ("bad-huge", "decompression-bomb guard")):
    hits = [l for l in lines if f"skipping sample {sid}:" in l and why in l]
    assert hits, f"no log line for {sid}"
    assert len({h.split("] ", 1)[-1] for h in hits}) == 1, hits  # one reason per bad sample
