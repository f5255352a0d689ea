"""Reading CLUE-style jsonl files: one JSON object per non-empty line, errors naming file and line."""

from __future__ import annotations

import json
import os
import pathlib


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
