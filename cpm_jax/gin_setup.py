"""Parsing gin files and bindings for the experiment programs, with errors that name the culprit."""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
from typing import Iterator, Sequence

import gin

GIN_CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"


class ConfigError(ValueError):
  """A configuration that cannot work (sizes that do not fit, a mesh the devices cannot form, a restore the checkpoint
  cannot supply); the message names the gin binding and what was expected."""


@contextlib.contextmanager
def exit_on_config_error(program: str) -> Iterator[None]:
  """In a program's main: a ConfigError becomes the one line `program: message` and exit status 1."""
  try:
    yield
  except ConfigError as e:
    sys.exit(f"{program}: {e}")


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
