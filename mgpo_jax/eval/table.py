"""Each benchmark's own score, and the results table in the paper's column order.

A benchmark's predictions are dicts with at least "category" and "correct" (see `suite`). Scores are
percentages.

  micro    V*, MME-RealWorld, the MGPO validation split: overall = correct / all; one column per
           category (V*: direct_attributes, relative_position; MME-RealWorld: "<Task>/<Subtask>").
  hrbench  HR-Bench's official score (VLMEvalKit's report_acc_hrbench): rows are grouped by
           cycle_category; within each group the accuracy of all rows and of each category
           (single, cross) is taken; each is then averaged over the groups. Categories arrive as
           "<category>/<cycle_category>" (see data.benchmarks.read_hrbench).

The table has one row (this model and protocol) and the columns "<benchmark>" (overall) and
"<benchmark>/<category>", benchmarks in `COLUMN_ORDER` (the papers' order: V*, HR-Bench 4K / 8K,
MME-RealWorld), known categories in their papers' order, any others after them, sorted.
"""

from __future__ import annotations

import collections
import enum
from typing import Any, Iterable, Mapping, Sequence


class Scoring(enum.StrEnum):
  MICRO = "micro"
  HRBENCH = "hrbench"


def _pct(k: float, n: float) -> float:
  return 100.0 * k / n if n else float("nan")


def _ordered(known: Sequence[str], found: Iterable[str]) -> list[str]:
  found = set(found)
  return [c for c in known if c in found] + sorted(found - set(known))


def micro_score(predictions: Sequence[Mapping[str, Any]], categories: Sequence[str] = ()) -> dict[str, float]:
  """{"overall": %, <category>: %, ...}: accuracy over all rows and per category."""
  right, count = collections.Counter(), collections.Counter()
  for p in predictions:
    right[p["category"]] += bool(p["correct"])
    count[p["category"]] += 1
  out = {"overall": _pct(sum(right.values()), sum(count.values()))}
  for c in _ordered(categories, count):
    out[c] = _pct(right[c], count[c])
  return out


def hrbench_score(predictions: Sequence[Mapping[str, Any]], categories: Sequence[str] = ("single", "cross")
                  ) -> dict[str, float]:
  """{"overall": %, "single": %, "cross": %}: per-cycle accuracies, averaged over the cycles."""
  by_cycle: dict[str, list[tuple[str, bool]]] = collections.defaultdict(list)
  for p in predictions:
    category, _, cycle = str(p["category"]).partition("/")
    by_cycle[cycle].append((category, bool(p["correct"])))
  sums: dict[str, float] = collections.defaultdict(float)
  for rows in by_cycle.values():
    sums["overall"] += _pct(sum(ok for _, ok in rows), len(rows))
    for c in {c for c, _ in rows}:
      hits = [ok for cc, ok in rows if cc == c]
      sums[c] += _pct(sum(hits), len(hits))
  n = len(by_cycle)
  out = {"overall": sums.pop("overall") / n if n else float("nan")}
  for c in _ordered(categories, sums):
    out[c] = sums[c] / n
  return out


SCORERS = {Scoring.MICRO: micro_score, Scoring.HRBENCH: hrbench_score}


def score(predictions: Sequence[Mapping[str, Any]], scoring: Scoring | str, categories: Sequence[str] = ()
          ) -> dict[str, float]:
  return SCORERS[Scoring(scoring)](predictions, categories)


def target_in_box(predictions: Sequence[Mapping[str, Any]], categories: Sequence[str] = ()) -> dict[str, float]:
  """Share (%) of samples with a known target whose turn-1 crop holds the whole target (an invalid
  or missing box counts as a miss), overall and per category; {} when no sample has a target."""
  rows = [p for p in predictions if p.get("target_in_box") is not None]
  return micro_score([{"category": p["category"], "correct": p["target_in_box"]} for p in rows],
                     categories) if rows else {}


def columns(scores: Mapping[str, Mapping[str, float]], order: Sequence[str]) -> dict[str, float]:
  """The table's row: "<benchmark>" then "<benchmark>/<category>" per benchmark, in `order`."""
  row = {}
  for name in _ordered(order, scores):
    for key, value in scores[name].items():
      row[name if key == "overall" else f"{name}/{key}"] = value
  return row


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return "-" if v != v else f"{v:.1f}"
  return str(v)


def markdown(rows: Sequence[Mapping[str, Any]], cols: Sequence[str]) -> str:
  """A Markdown table of `rows` (dicts) over `cols`; floats with one decimal, NaN as "-"."""
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
  return "\n".join(lines) + "\n"
