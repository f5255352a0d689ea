"""Reading CLUE-style jsonl files: one JSON object per non-empty line, errors naming file and line."""

from __future__ import annotations

import json
import os
import pathlib


def read_objects(path: str | os.PathLike) -> list[tuple[int, dict]]:
  """(line number, object) for every non-empty line of `path`."""
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise FileNotFoundError(f"Input file {path} does not exist.")
  objects = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON object.") from e
      if not isinstance(obj, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}.")
      objects.append((number, obj))
  return objects
