"""Writing evaluation outputs (atomically: a temporary file renamed when complete) and a console table."""

from __future__ import annotations

import json
import os
from typing import Iterable

from cpm_jax.evaluation.tasks import Result


def write_atomic(path: str | os.PathLike, text: str) -> None:
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def jsonl_text(records: Iterable[dict]) -> str:
  """One JSON line per record."""
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
  write_atomic(path, jsonl_text(records))


def write_result(path: str | os.PathLike, task: str, result: Result, settings: dict) -> None:
  """One JSON: task name, settings (checkpoint, input, shots, ...), metrics and per-example predictions."""
  write_atomic(path, json.dumps({"task": task, "settings": settings, "metrics": result.metrics,
                                 "predictions": result.predictions}, ensure_ascii=False, indent=1))


def table(task: str, metrics: dict[str, float]) -> str:
  """A readable two-column table of the metrics."""
  width = max(len(name) for name in metrics) if metrics else 0
  lines = [f"{task}", "-" * (width + 14)]
  for name, value in metrics.items():
    shown = f"{value:.4f}" if isinstance(value, float) else str(value)
    lines.append(f"{name:<{width}}  {shown:>12}")
  return "\n".join(lines)
