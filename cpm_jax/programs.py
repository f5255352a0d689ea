"""What every program in experiments/ shares: absl's app.run, with a user's error as one line instead of a traceback.

`programs.run(main)` runs `main(argv)` as absl's `app.run` does, after refusing stray arguments and quieting the
libraries' start-up noise (cpm_jax.logging_setup). A user error ends the program with `PROGRAM: message` on stderr
and exit status 1; Ctrl-C outside training (which saves first: cpm_jax.train_loop) with `PROGRAM: interrupted` and
status 130. Nothing runs after that line (no interpreter shutdown that would let Orbax's or tensorstore's threads
print their own errors). `--traceback` re-raises instead, for bug reports.

User errors: absl's UsageError and the two kinds the library raises with messages that name the
file, flag, binding or key: ValueError (gin_setup.ConfigError, convert's ConversionError, checksums'
CheckpointDamaged, a value or a file's contents that cannot work) and OSError (a path that is missing, exists
already or cannot be read); a program adds its own (train.py: TrainingDiverged). Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging

from cpm_jax import logging_setup

_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an error, show the Python traceback (for a bug report) "
                               "instead of the one-line message.")

_GIN_CONTEXT = "  In call to configurable "  # the line gin appends to errors raised inside a configurable
_OS_REASONS = {errno.ENOENT: "does not exist", errno.EEXIST: "already exists", errno.EACCES: "cannot be accessed "
               "(permission denied)", errno.EISDIR: "is a directory, not a file", errno.ENOTDIR: "is not a directory"}


def describe(error: BaseException) -> str:
  """The message a program prints for a user error: its own text, without gin's call context."""
  lines = [line.rstrip() for line in str(error).splitlines() if not line.startswith(_GIN_CONTEXT)]
  return "\n".join(line for line in lines if line) or type(error).__name__


def describe_os_error(error: OSError) -> str:
  """`describe` for an OSError; one the operating system raised (with a file name and no message of cpm_jax's) as
  `PATH does not exist` and the like."""
  if error.errno is not None and error.filename is not None:
    return f"{error.filename} {_OS_REASONS.get(error.errno, error.strerror)}."
  return describe(error)


def require_existing(*path_flags: flags.FlagHolder, multi: Sequence[flags.FlagHolder] = ()) -> None:
  """Raises a FileNotFoundError naming the first path given to these flags (`multi`: multi-string flags) that does
  not exist (a cheap check to make before slow work)."""
  given = [(flag.name, flag.value) for flag in path_flags]
  given += [(flag.name, value) for flag in multi for value in flag.value or ()]
  for name, value in given:
    if value and not os.path.exists(os.path.expanduser(value)):
      raise FileNotFoundError(f"--{name}={value} does not exist.")


def _exit(message: str, status: int) -> None:
  """Prints `message` last and ends the process at once."""
  absl_logging.flush()
  sys.stdout.flush()
  print(message, file=sys.stderr, flush=True)
  os._exit(status)


def run(main: Callable[[list[str]], None], user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """absl's app.run(main) with user errors (and `user_errors`) as one line (see the module docstring)."""
  program = os.path.basename(sys.argv[0])

  def guarded(argv: list[str]) -> None:
    logging_setup.quiet_library_logs()
    try:
      if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (every input is a --flag; --help lists them).")
      main(argv)
    except OSError as e:
      if _TRACEBACK.value:
        raise
      _exit(f"{program}: {describe_os_error(e)}", 1)
    except (app.UsageError, ValueError, *user_errors) as e:
      if _TRACEBACK.value:
        raise
      _exit(f"{program}: {describe(e)}", 1)
    except KeyboardInterrupt as e:
      if _TRACEBACK.value:
        raise
      _exit(f"{program}: {describe(e) if str(e) else 'interrupted.'}", 130)

  app.run(guarded)
