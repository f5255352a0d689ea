"""Runs several experiments/ programs, each in a child forked from this process after the libraries were imported
once (the programs' own start-up is mostly those imports): `python _forked_programs.py OUT_DIR` reads one JSON list
of argument lists from stdin (argv[0] is the program's file name in experiments/) and writes OUT_DIR/<i>.json with
each child's exit status, stdout and stderr. Each child runs its program file as __main__, as `python PROGRAM` would.
"""

import json
import os
import pathlib
import runpy
import sys
import tempfile

import jax  # noqa: F401  (imported once for every child; no backend is started before the fork)
import orbax.checkpoint  # noqa: F401
from absl import app  # noqa: F401

from cpm_jax import checkpointing, decoding, programs, train_loop  # noqa: F401
from cpm_jax.data import corpus, pipeline  # noqa: F401
from cpm_jax.evaluation import model, tasks  # noqa: F401
from cpm_jax.models import registry  # noqa: F401

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_child(argv: list[str], out: pathlib.Path) -> None:
  with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
    pid = os.fork()
    if pid == 0:
      os.dup2(stdout.fileno(), 1)
      os.dup2(stderr.fileno(), 2)
      sys.argv = [str(ROOT / "experiments" / argv[0]), *argv[1:]]
      try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        status = 0
      except SystemExit as e:
        status = e.code if isinstance(e.code, int) else int(e.code is not None)  # sys.exit(None): 0
      except BaseException:  # noqa: BLE001  (a traceback, as python would print it)
        import traceback
        traceback.print_exc()
        status = 1
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    stdout.seek(0)
    stderr.seek(0)
    out.write_text(json.dumps({"returncode": os.waitstatus_to_exitcode(wait_status), "stdout": stdout.read(),
                               "stderr": stderr.read()}))


if __name__ == "__main__":
  out_dir = pathlib.Path(sys.argv[1])
  for index, argv in enumerate(json.loads(sys.stdin.read())):
    _run_child(argv, out_dir / f"{index}.json")
