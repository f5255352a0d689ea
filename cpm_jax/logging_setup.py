"""What the programs log: absl logging without the libraries' probe noise.

Three libraries log at start-up what alarms users but reports no fault:
- gin's `include 'models/cpm_tiny.gin'` first looks for the file relative to the current directory, then asks its
  Python-package resource reader, which logs `ERROR resource_reader.py:55] Path not found: ...` before gin goes on
  to gin_configs/ (cpm_jax.gin_setup's search path) and finds it. A file found nowhere is still an error: gin
  raises, and gin_setup names the file.
- jax probes every backend it knows when it first needs devices; with no TPU runtime installed it logs
  `Unable to initialize backend 'tpu': ... libtpu.so: cannot open shared object file`. A backend that is installed
  but fails still logs (the probe drops only "not installed" records), and with no backend at all jax raises.
- Orbax logs every checkpoint save at INFO, and warns when a checkpoint is opened to be read that a read-only
  manager saves nothing ("read_only=True, setting ...", "Given directory is read only").
- TFDS logs every dataset it opens ("Load dataset info", "Reusing dataset"; cpm_jax.data.sources logs one line for
  a dataset it builds), and while it builds one warns that the folder it is building in "has no dataset_info.json".

Progress (`progress`) is a tqdm bar on a terminal and a few plain log lines with an ETA otherwise, so a log file
or a pipe gets no carriage-return updates; TFDS's own bars and its "Downloading and preparing" banner for a local
build are dropped in cpm_jax.data.sources.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

import tqdm
from absl import logging as absl_logging

Item = TypeVar("Item")


def is_probe_noise(record: logging.LogRecord) -> bool:
  """Whether `record` is one of the library messages above that reports no fault."""
  path = record.pathname.replace("\\", "/")
  if path.endswith("gin/resource_reader.py"):
    return record.levelno <= logging.ERROR  # its existence probe: "system_path_file_exists", "Path not found"
  if path.endswith("jax/_src/xla_bridge.py") and record.levelno <= logging.INFO:
    message = record.getMessage()
    return message.startswith("Unable to initialize backend") and (
        "cannot open shared object file" in message or "No such file" in message)
  if record.levelno < logging.WARNING:
    return "/orbax/" in path or "/tensorflow_datasets/" in path
  message = record.getMessage()
  if "/orbax/" in path:
    return message.startswith("CheckpointManagerOptions.read_only=True") or "directory is read only" in message
  return path.endswith("tensorflow_datasets/core/utils/file_utils.py") and message.endswith("has no dataset_info.json")


class _DropProbeNoise(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not is_probe_noise(record)


_FILTER = _DropProbeNoise()


def quiet_library_logs() -> None:
  """Drops the probe noise from the program's log (absl's handler, where every library's records end up); call
  first in a program's main. Warnings and errors of the libraries otherwise still show."""
  absl_logging.get_absl_handler().addFilter(_FILTER)  # a no-op when already added


def is_terminal() -> bool:
  """Whether progress bars can redraw in place (stderr is a terminal)."""
  return sys.stderr.isatty()


def progress(items: Iterable[Item], *, desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True, lines: int = 4) -> Iterator[Item]:
  """`items`, showing progress: a tqdm bar on a terminal; otherwise about `lines` log lines (done / total, rate,
  ETA) and one at the end, none without a known total but the last. Nothing when not enabled."""
  if not enabled:
    yield from items
    return
  if is_terminal():
    yield from tqdm.tqdm(items, desc=desc, total=total, unit=unit)
    return
  start, done, every = time.perf_counter(), 0, max(1, (total or 0) // lines) if total else None
  for item in items:
    yield item
    done += 1
    if every and done % every == 0 and done < total:
      seconds = time.perf_counter() - start
      absl_logging.info("%s: %d/%d %s, %.1f %s/s, ETA %s", desc, done, total, unit, done / seconds, unit,
                        time.strftime("%H:%M:%S", time.gmtime(seconds * (total - done) / done)))
  absl_logging.info("%s: %d %s in %.1f s", desc, done, unit, time.perf_counter() - start)
