"""Every program in experiments/ prints a user's mistake as one line naming the flag, binding or file, exits 1, and
leaves no output behind; --traceback shows the traceback instead (cpm_jax.programs)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from cpm_jax import checkpointing, programs
from cpm_jax.models import cpm, registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One bad input per program (tests/_forked_programs.py: each a fork of one process that imported the libraries,
  so that the programs' start-up is paid once)."""
  tmp = tmp_path_factory.mktemp("programs")
  (tmp / "workdir" / "checkpoints").mkdir(parents=True)  # a training workdir that holds no checkpoint yet
  record = registry.record(cpm.CPMConfig(vocab_size=64, num_layers=1, embed_dim=16, num_heads=2, max_positions=16))
  (tmp / "workdir" / checkpointing.MODEL_RECORD).write_text(json.dumps(record))
  (tmp / "bad.txt").write_bytes("好的文本\n".encode() + b"\xff\xfe broken\n")
  (tmp / "existing_output").mkdir()
  (tmp / "tnews.jsonl").write_text(json.dumps({"label_desc": "news_sports", "sentence": "比赛"}, ensure_ascii=False)
                                   + "\n" + json.dumps({"label_desc": "news_sports"}) + "\n")
  (tmp / "results").mkdir()
  cases = {
      "train": ("train.py", "--gin_file=experiments/cpm_demo.gin", f"--workdir={tmp / 'new_workdir'}",
                "--gin_bindings=train.num_steps = '2'"),
      "generate": ("generate.py", f"--checkpoint={tmp / 'workdir'}", "--prompt=你好"),
      "evaluate": ("evaluate.py", f"--checkpoint={tmp / 'workdir'}", "--task=no_such_task"),
      "evaluate_examples": ("evaluate.py", f"--checkpoint={tmp / 'workdir'}", "--task=tnews",
                            f"--input_file={tmp / 'tnews.jsonl'}"),  # checked before the (empty) checkpoint
      "convert": ("convert_checkpoint.py", "--from=megatron", "--to=orbax", f"--input={tmp}",
                  f"--output={tmp / 'existing_output'}"),
      "build_datasets": ("build_datasets.py", f"--corpus={tmp / 'missing.txt'}", f"--data_dir={tmp / 'tfds'}"),
      "train_tokenizer": ("train_tokenizer.py", f"--input={tmp / 'bad.txt'}", f"--output={tmp / 'sp.model'}"),
      "traceback": ("generate.py", f"--checkpoint={tmp / 'missing'}", "--prompt=你好", "--traceback"),
  }
  subprocess.run([sys.executable, str(ROOT / "tests" / "_forked_programs.py"), str(tmp / "results")], cwd=ROOT,
                 input=json.dumps(list(cases.values())), text=True, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  results = [json.loads((tmp / "results" / f"{i}.json").read_text()) for i in range(len(cases))]
  return tmp, {name: (r["returncode"], r["stdout"], r["stderr"]) for name, r in zip(cases, results)}


EXPECTED = {
    "train": r"train.py: train.num_steps = '2': expected int, not a str.",
    "generate": r"generate.py: Training workdir {tmp}/workdir holds no complete checkpoint in checkpoints/ yet ",
    "evaluate": r"evaluate.py: --task=no_such_task is no task of .*; the tasks are chid, .*\blm_score, .*\btnews \(or give",
    "evaluate_examples": r"evaluate.py: {tmp}/tnews.jsonl:2: .*'sentence'",
    "convert": r"convert_checkpoint.py: --output={tmp}/existing_output already exists",
    "build_datasets": r"build_datasets.py: --corpus={tmp}/missing.txt does not exist.",
    "train_tokenizer": r"train_tokenizer.py: {tmp}/bad.txt: invalid UTF-8 at byte offset 13 \(line 2\); .*--lenient",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_user_error_is_one_line_and_exit_1(runs, name):
  tmp, results = runs
  returncode, stdout, stderr = results[name]
  assert returncode == 1, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert re.match(EXPECTED[name].format(tmp=tmp), last), stderr[-3000:]
  assert "Traceback" not in stderr and "Error" not in stderr.replace(last, ""), stderr[-3000:]  # no noise after it
  assert not (tmp / "new_workdir").exists() and not (tmp / "tfds").exists() and not (tmp / "sp.model").exists()


def test_traceback_flag_shows_the_traceback(runs):
  returncode, _, stderr = runs[1]["traceback"]
  assert returncode != 0 and "Traceback (most recent call last)" in stderr
  assert "FileNotFoundError: --checkpoint=" in stderr


def test_os_errors_name_the_path_and_the_reason(tmp_path):
  with pytest.raises(OSError) as missing:
    open(tmp_path / "missing.jsonl")
  assert programs.describe_os_error(missing.value) == f"{tmp_path / 'missing.jsonl'} does not exist."
  own = FileNotFoundError("--input_file=x.jsonl does not exist.")
  assert programs.describe_os_error(own) == "--input_file=x.jsonl does not exist."
