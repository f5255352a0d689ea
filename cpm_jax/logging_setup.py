"""What the programs log: absl logging without the libraries' probe noise.

Three libraries log at start-up what alarms users but reports no fault:
- gin's `include 'models/cpm_tiny.gin'` first looks for the file relative to the current directory, then asks its
  Python-package resource reader, which logs `ERROR resource_reader.py:55] Path not found: ...` before gin goes on
  to gin_configs/ (cpm_jax.gin_setup's search path) and finds it. A file found nowhere is still an error: gin
  raises, and gin_setup names the file.
- jax probes every backend it knows when it first needs devices; with no TPU runtime installed it logs
  `Unable to initialize backend 'tpu': ... libtpu.so: cannot open shared object file`. A backend that is installed
  but fails still logs (the probe drops only "not installed" records), and with no backend at all jax raises.
- Orbax logs every checkpoint save at INFO, and warns "Given directory is read only" whenever a checkpoint is
  opened for reading only, as cpm_jax.checkpointing does on purpose to read a training workdir's params.
"""

from __future__ import annotations

import logging

from absl import logging as absl_logging


def is_probe_noise(record: logging.LogRecord) -> bool:
  """Whether `record` is one of the library messages above that reports no fault."""
  path = record.pathname.replace("\\", "/")
  if path.endswith("gin/resource_reader.py"):
    return record.levelno <= logging.ERROR  # its existence probe: "system_path_file_exists", "Path not found"
  if path.endswith("jax/_src/xla_bridge.py") and record.levelno <= logging.INFO:
    message = record.getMessage()
    return message.startswith("Unable to initialize backend") and (
        "cannot open shared object file" in message or "No such file" in message)
  if "/orbax/" not in path:
    return False
  return record.levelno < logging.WARNING or record.getMessage().startswith("Given directory is read only")


class _DropProbeNoise(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not is_probe_noise(record)


_FILTER = _DropProbeNoise()


def quiet_library_logs() -> None:
  """Drops the probe noise from the program's log (absl's handler, where every library's records end up); call
  first in a program's main. Warnings and errors of the libraries otherwise still show."""
  absl_logging.get_absl_handler().addFilter(_FILTER)  # a no-op when already added
