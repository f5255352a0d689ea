"""Reading CLUE-style jsonl files: one JSON object per non-empty line, errors naming file and line."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable


def parse_object(line: str, where: str) -> dict:
  """One line's JSON object; `where` (file:line) names it in the error when the line is not one."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON object.") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}.")
  return obj


def read_objects(path: str | os.PathLike) -> list[tuple[int, dict]]:
  """(line number, object) for every non-empty line of `path`."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Input file {path} does not exist.")
  with open(path, encoding="utf-8") as f:
    return [(number, parse_object(line, f"{path}:{number}")) for number, line in enumerate(f, start=1)
            if line.strip()]


def read_examples(path: str | os.PathLike, required: Iterable[str] = (), where_key: str | None = None) -> list[dict]:
  """The objects of a jsonl file, at least one; each must hold the `required` fields. With `where_key`, each also
  holds its origin ("file:line") under that key, for later error messages."""
  required = list(required)
  examples = []
  for number, example in read_objects(path):
    missing = [field for field in required if field not in example]
    if missing:
      raise ValueError(f"{path}:{number}: missing field(s) {missing}; expected {required}.")
    examples.append({**example, where_key: f"{path}:{number}"} if where_key else example)
  if not examples:
    raise ValueError(f"{path}: no examples (every line is empty).")
  return examples
