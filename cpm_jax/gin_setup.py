"""Parsing gin files and bindings for the experiment programs, with errors that name the culprit."""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import gin

GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"


def parse(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files (paths, or relative to gin_configs/) then bindings; fails on any unknown name.

  Import the modules whose configurables the files bind before calling this.
  """
  resolved = []
  for name in files:
    candidates = [pathlib.Path(name), GIN_CONFIGS_DIR / name]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
      raise FileNotFoundError(f"--gin_file {name!r}: no such file (looked at {', '.join(map(str, candidates))}).")
    resolved.append(os.fspath(found))
  gin.add_config_file_search_path(os.fspath(GIN_CONFIGS_DIR))
  try:
    gin.parse_config_files_and_bindings(resolved, bindings, finalize_config=False)
  except (ValueError, KeyError) as e:
    raise ValueError(f"Invalid gin configuration ({', '.join(resolved) or 'no files'}; bindings {list(bindings)}): "
                     f"{e}") from e
