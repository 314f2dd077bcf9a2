"""The benchmarks by name, evaluated with one protocol; the table and per-sample predictions.

  python -m mgpo_jax.evaluate --checkpoint=<workdir or HF dir> \\
      --benchmarks=vstar,hrbench_4k,hrbench_8k,mme_realworld_lite [--protocol=mgpo|direct] [--max_turns=K]

Protocols (greedy decoding, one sample per question):

  mgpo     turn 1 asks for the key region (JSON box), the host crops it from the original image, the
           last turn answers in \\boxed{} (`max_turns` = K turns in all; default the config's, 2).
  direct   one turn: image, question, options, answer (the base model and the GRPO baseline).

A benchmark is read lazily and run `batch_size` questions at a time, so only one batch of decoded
images is held (HR-Bench 8K images are 33 M pixels each). Rows the reader could not use and images
the pipeline could not decode are skipped (logged) and counted in the output.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from mgpo_jax.data import benchmarks as bench_lib
from mgpo_jax.data import pipeline
from mgpo_jax.data import readers
from mgpo_jax.data import schema
from mgpo_jax.eval import grading
from mgpo_jax.eval import table as table_lib
from mgpo_jax.rollout import crop as crop_lib
from mgpo_jax.rollout import engine as engine_lib


class Protocol(enum.StrEnum):
  MGPO = "mgpo"
  DIRECT = "direct"


# MME-RealWorld's tasks in its paper's order (names as the lmms-eval parquet's `category`; unverified
# for every release, unknown ones are appended).
_MME_CATEGORIES = tuple(f"{task}/{sub}" for task in ("Perception", "Reasoning") for sub in (
    "OCR with Complex Context", "Remote Sensing", "Diagram and Table", "Monitoring", "Autonomous_Driving"))


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """A benchmark: its reader, where it is found below the data root by default, how it is scored."""

  name: str
  source: readers.SourceKind
  default_path: str
  scoring: table_lib.Scoring = table_lib.Scoring.MICRO
  categories: tuple[str, ...] = ()
  download: str = ""


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("vstar", readers.SourceKind.VSTAR, "vstar_bench", categories=bench_lib.VSTAR_CATEGORIES,
              download="craigwu/vstar_bench"),
    Benchmark("hrbench_4k", readers.SourceKind.HRBENCH, "HR-Bench/hr_bench_4k.parquet",
              table_lib.Scoring.HRBENCH, ("single", "cross"), "DreamMr/HR-Bench"),
    Benchmark("hrbench_8k", readers.SourceKind.HRBENCH, "HR-Bench/hr_bench_8k.parquet",
              table_lib.Scoring.HRBENCH, ("single", "cross"), "DreamMr/HR-Bench"),
    Benchmark("mme_realworld_lite", readers.SourceKind.MME_REALWORLD, "MME-RealWorld-lite-lmms-eval",
              categories=_MME_CATEGORIES, download="yifanzhang114/MME-RealWorld-lite-lmms-eval"),
    Benchmark("mme_realworld", readers.SourceKind.MME_REALWORLD, "MME-RealWorld-Lmms-eval",
              categories=_MME_CATEGORIES, download="yifanzhang114/MME-RealWorld-Lmms-eval"),
    Benchmark("mgpo_val", readers.SourceKind.MGPO_PARQUET, "mme_realworld_lite_1919_vstar_191_sum_2110",
              categories=("v_star",), download="xinyu1205/mme_realworld_lite_1919_vstar_191_sum_2110"),
)}
# The table's column order: the papers' (V*, HR-Bench 4K / 8K, MME-RealWorld), then the rest.
COLUMN_ORDER = tuple(BENCHMARKS)


def parse_benchmarks(names: str) -> list[str]:
  """["vstar", ...] from "vstar,hrbench_4k"; ValueError naming the known ones on a typo."""
  out = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in out if n not in BENCHMARKS]
  if unknown or not out:
    raise ValueError(f"unknown benchmark(s) {unknown or names!r}; known: {sorted(BENCHMARKS)}")
  return out


def parse_paths(spec: str) -> dict[str, str]:
  """{"vstar": "/x"} from "vstar=/x,hrbench_4k=/y.tsv"."""
  out = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, path = item.partition("=")
    if not sep or name not in BENCHMARKS:
      raise ValueError(f"--benchmark_paths item {item!r} is not <benchmark>=<path> (known: {sorted(BENCHMARKS)})")
    out[name] = path
  return out


def reader_kwargs(bench: Benchmark, path: str, *, image_root: str = "", path_prefix: str = "") -> dict[str, Any]:
  if bench.source is readers.SourceKind.VSTAR:
    return {"root": path}
  if bench.source is readers.SourceKind.MME_REALWORLD:
    return {"path": path, "image_root": image_root or None}
  if bench.source is readers.SourceKind.MGPO_PARQUET:
    return {"path": path, "path_prefix": path_prefix}
  return {"path": path}


# ------------------------------------------------------------------------------------------------
# Running one benchmark.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BenchmarkRun:
  predictions: list[dict[str, Any]]        # this process's, one per scored question
  skipped: list[dict[str, str]]            # rows / images that could not be used: where, reason


def _prediction(tr, sample: Mapping[str, Any], grader: grading.Grader, patch_size: int) -> dict[str, Any]:
  pred, correct = grading.grade(tr.texts[-1], sample, grader)
  original = tr.images[0].size
  grid = tr.image_grids[0]
  input_size = (int(grid[2]) * patch_size, int(grid[1]) * patch_size)
  crops = [list(crop_lib.map_box_to_original(b, input_size, original)) if ok else None
           for b, ok in zip(tr.boxes, tr.box_valid)]
  target = sample.get(schema.TARGET_BOX)
  in_box = None
  if target is not None and tr.boxes:  # only protocols with a grounding turn
    in_box = bool(tr.box_valid[0]) and crop_lib.target_coverage(tr.boxes[0], input_size, original, target) >= 1.0
  return {"id": sample[schema.ID], "category": sample[schema.CATEGORY], "answer": sample[schema.ANSWER],
          "prediction": pred, "correct": bool(correct), "texts": list(tr.texts),
          "boxes": [list(b) if b is not None else None for b in tr.boxes], "box_valid": list(tr.box_valid),
          "crops": crops, "input_size": list(input_size), "image_size": list(original),
          "target_box": list(target) if target is not None else None, "target_in_box": in_box}


def run_benchmark(engine, records: Iterable[Mapping[str, Any]], *, grader: grading.Grader | str, batch_size: int,
                  max_image_pixels: int = pipeline.DEFAULT_MAX_IMAGE_PIXELS, num_samples: int = 0, rng=None,
                  process_index: int = 0, process_count: int = 1) -> BenchmarkRun:
  """Greedy rollouts of `engine` on this process's stride of `records` (the first `num_samples`; 0 =
  all), decoded and run a batch at a time; each graded with `grader`."""
  rng = jax.random.key(0) if rng is None else rng
  grader = grading.Grader(grader)
  decode = pipeline.DecodeImage(max_image_pixels)
  patch = engine.cfg.image.patch_size
  run = BenchmarkRun([], [])
  batch: list[dict[str, Any]] = []

  def flush():
    if batch:
      # A short last batch is filled up with copies of its last question (their rollouts dropped): the
      # sampler compiles per number of rows, and a recompile costs more than the spare rows.
      result = engine.run(batch + [batch[-1]] * (batch_size - len(batch)), rng)
      run.predictions.extend(_prediction(tr, batch[tr.sample_index], grader, patch)
                             for tr in result.trajectories if tr.sample_index < len(batch))
      batch.clear()

  for i, record in enumerate(records):
    if num_samples and i >= num_samples:
      break
    if i % process_count != process_index:
      continue
    sample = decode.decode(record)
    if isinstance(sample, str):
      pipeline.logger.warning("skipping sample %s: %s", record[schema.ID], sample)
      run.skipped.append({"where": str(record[schema.ID]), "reason": sample})
      continue
    batch.append(sample)
    if len(batch) == batch_size:
      flush()
  flush()
  return run


# ------------------------------------------------------------------------------------------------
# The suite.
# ------------------------------------------------------------------------------------------------


def _allgather_json(obj: Any) -> list[Any]:
  """`obj` of every process (JSON-able), in process order."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(everything, sizes)]


def run_suite(engine, names: Sequence[str], paths: Mapping[str, str], *, protocol: Protocol | str, batch_size: int,
              max_image_pixels: int = pipeline.DEFAULT_MAX_IMAGE_PIXELS, num_samples: int = 0,
              image_root: str = "", path_prefix: str = "",
              on_predictions: Callable[[str, list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
  """Runs each benchmark of `names` (read from `paths[name]`) and scores it.

  Every process must call this; each runs its stride of every benchmark. `on_predictions(name,
  predictions)` receives this process's predictions of each benchmark. Returns (on every process)
  {"protocol", "max_turns", "columns", "row", "benchmarks": {name: {"path", "num_scored",
  "num_skipped", "skipped", "scores", "valid_box_rate", "target_in_box"}}}.
  """
  protocol = Protocol(protocol)
  grader = grading.Grader.DIRECT if protocol is Protocol.DIRECT else grading.Grader.MGPO
  per_bench: dict[str, Any] = {}
  for name in names:
    bench = BENCHMARKS[name]
    bad = bench_lib.BadRows()
    records = readers.read_source(bench.source, **reader_kwargs(bench, paths[name], image_root=image_root,
                                                                path_prefix=path_prefix), bad_rows=bad)
    run = run_benchmark(engine, records, grader=grader, batch_size=batch_size, max_image_pixels=max_image_pixels,
                        num_samples=num_samples, process_index=jax.process_index(),
                        process_count=jax.process_count())
    if on_predictions is not None:
      on_predictions(name, run.predictions)
    # Bad reader rows are seen by every process (each reads the whole file): count them once.
    local = {"predictions": [{k: p[k] for k in ("category", "correct", "box_valid", "target_in_box")}
                             for p in run.predictions],
             "skipped": run.skipped + (bad.rows if jax.process_index() == 0 else [])}
    gathered = _allgather_json(local)
    preds = [p for g in gathered for p in g["predictions"]]
    skipped = [s for g in gathered for s in g["skipped"]]
    boxes = [p["box_valid"][0] for p in preds if p["box_valid"]]
    per_bench[name] = {
        "path": paths[name], "num_scored": len(preds), "num_skipped": len(skipped), "skipped": skipped,
        "scores": table_lib.score(preds, bench.scoring, bench.categories),
        "valid_box_rate": 100.0 * float(np.mean(boxes)) if boxes else None,
        "target_in_box": table_lib.target_in_box(preds, bench.categories),
    }
  row = table_lib.columns({n: b["scores"] for n, b in per_bench.items()}, COLUMN_ORDER)
  return {"protocol": str(protocol), "max_turns": engine.cfg.num_turns, "columns": list(row), "row": row,
          "benchmarks": per_bench}


def protocol_rollout(rollout: engine_lib.RolloutConfig, protocol: Protocol | str, max_turns: int = 0
                     ) -> engine_lib.RolloutConfig:
  """`rollout` (the config's greedy eval settings) in the protocol's mode; `max_turns` > 0 sets the
  turns of `mgpo` (else the config's)."""
  if Protocol(protocol) is Protocol.DIRECT:
    return dataclasses.replace(rollout, mode=engine_lib.RolloutMode.SINGLE_TURN)
  return dataclasses.replace(rollout, mode=engine_lib.RolloutMode.MGPO,
                             max_turns=max_turns if max_turns > 0 else rollout.max_turns)


def tag(protocol: Protocol | str, num_turns: int) -> str:
  """"mgpo" (2 turns), "mgpo_3turns", "direct": names the output files of a protocol."""
  protocol = Protocol(protocol)
  if protocol is Protocol.MGPO and num_turns != 2:
    return f"mgpo_{num_turns}turns"
  return str(protocol)


def summary_markdown(result: Mapping[str, Any], model: str = "") -> str:
  """The results table, then per benchmark: questions scored / skipped, valid turn-1 boxes and the
  share of turn-1 crops holding the known target (V*)."""
  row = {"model": model or "-", "protocol": tag(result["protocol"], result["max_turns"]), **result["row"]}
  out = [table_lib.markdown([row], ["model", "protocol", *result["columns"]])]
  counts = []
  for name, b in result["benchmarks"].items():
    hit = b["target_in_box"]
    counts.append({"benchmark": name, "scored": b["num_scored"], "skipped": b["num_skipped"],
                   "valid box %": b["valid_box_rate"] if b["valid_box_rate"] is not None else "-",
                   "target in box %": " / ".join(f"{k} {v:.1f}" for k, v in hit.items()) if hit else "-"})
  out.append(table_lib.markdown(counts, ["benchmark", "scored", "skipped", "valid box %", "target in box %"]))
  return "\n".join(out)


def write_outputs(out_dir: str, result: Mapping[str, Any], step: int, model: str, write_file) -> list[str]:
  """benchmarks_<step>_<tag>.json and .md under `out_dir` (process 0 only); returns their paths."""
  base = os.path.join(out_dir, f"benchmarks_{step}_{tag(result['protocol'], result['max_turns'])}")
  write_file(base + ".json", json.dumps({"model": model, "step": step, **result}, indent=1).encode())
  write_file(base + ".md", summary_markdown(result, model).encode())
  return [base + ".json", base + ".md"]
