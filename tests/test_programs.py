"""Every program in experiments/ prints a user's mistake as one line naming the flag, binding or file, exits 1, and
leaves no output behind; --traceback shows the traceback instead (cpm_jax.programs). Besides one mistake per
program: bad prompts, sampling values out of range, a damaged data shard, checkpoints of another shape or family
and a tokenizer larger than the model's vocabulary, through generate.py and evaluate.py."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import pytest

from _data_helpers import demo_data_dir  # noqa: F401  (session fixture)
from cpm_jax import checkpointing, programs
from cpm_jax.models import cpm, kg, plug, registry

ROOT = pathlib.Path(__file__).resolve().parents[1]


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PLUG = plug.PlugConfig(vocab_size=32, num_encoder_layers=1, num_decoder_layers=1, embed_dim=16, num_heads=2,
                       mlp_dim=32, max_positions=16)


def _checkpoints(tmp):
  """A tiny PLUG checkpoint (a 19-token vocab.txt, padded to 32 rows), one whose record says another shape than its
  params have, a KG checkpoint, and a 45-token vocab.txt."""
  (tmp / "vocab.txt").write_text("".join(f"{token}\n" for token in BERT_SPECIALS + list("你好天气今日北京中国的首都是")))
  (tmp / "big_vocab.txt").write_text("".join(f"{token}\n" for token in BERT_SPECIALS + [chr(0x4E00 + i)
                                                                                         for i in range(40)]))
  params = plug.init(PLUG, jax.random.key(0))
  checkpointing.save_params(tmp / "plug", params, registry.record(PLUG, tokenizer=str(tmp / "vocab.txt")))
  wider = dataclasses.replace(PLUG, embed_dim=32, mlp_dim=64)
  checkpointing.save_params(tmp / "plug_shape", params, registry.record(wider, tokenizer=str(tmp / "vocab.txt")))
  (tmp / "kg_vocab").mkdir()
  (tmp / "kg_vocab" / "metadata.json").write_text(json.dumps({"entities": [f"e{i}" for i in range(20)],
                                                              "relations": ["r0", "r1", "r2"]}))
  config = kg.KGConfig(num_entities=20, num_relations=3, dim=6)
  checkpointing.save_params(tmp / "kg", kg.init(config, jax.random.key(0)),
                            registry.record(config, tokenizer=str(tmp / "kg_vocab")))


def _damaged_dataset(data_dir, tmp):
  """A copy of the demo data_dir's review_sentiment whose test shard is cut in half."""
  shutil.copytree(data_dir / "review_sentiment", tmp / "tfds_damaged" / "review_sentiment")
  shard = next((tmp / "tfds_damaged" / "review_sentiment").glob("*/review_sentiment-test.array_record-*"))
  shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
  return shard


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data_dir):  # noqa: F811
  """One bad input per program, then the bad inputs of generate.py and evaluate.py (tests/_forked_programs.py: each a
  fork of one process that imported the libraries, so that the programs' start-up is paid once)."""
  tmp = tmp_path_factory.mktemp("programs")
  _checkpoints(tmp)
  shard = _damaged_dataset(demo_data_dir, tmp)
  (tmp / "empty.jsonl").write_text("\n")
  (tmp / "invalid.jsonl").write_text('{"prompt": "你好"}\n{"prompt": 你好}\n')
  (tmp / "texts.jsonl").write_text(json.dumps({"text": "你好"}) + "\n")
  (tmp / "queries.jsonl").write_text(json.dumps({"head": "e1", "relation": "r0"}) + "\n")
  generate = ("generate.py", f"--checkpoint={tmp / 'plug'}", "--prompt=你好", f"--output={tmp / 'out.jsonl'}")
  lm_score = ("evaluate.py", f"--checkpoint={tmp / 'plug'}", "--task=lm_score", f"--input_file={tmp / 'texts.jsonl'}",
              f"--output={tmp / 'result.json'}")
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
      "empty_prompts": (*generate[:2], f"--input_file={tmp / 'empty.jsonl'}", generate[3]),
      "invalid_prompts": (*generate[:2], f"--input_file={tmp / 'invalid.jsonl'}", generate[3]),
      "temperature": (*generate, "--temperature=0"),
      "top_p_zero": (*generate, "--top_p=0"),
      "top_p_above_one": (*generate, "--top_p=1.5"),
      "top_k": (*generate, "--top_k=-1"),
      "max_new_tokens": (*generate, "--max_new_tokens=0"),
      "beam_size": (*generate, "--beam_size=-2"),
      "suppress_tokens": (*generate, "--suppress_tokens=3", "--suppress_tokens=-1"),
      "evaluate_temperature": (*lm_score, "--decoding=sample", "--gin_bindings=SamplingConfig.temperature = 0.0"),
      "evaluate_beams": (*lm_score, "--decoding=beam", "--gin_bindings=BeamSearchConfig.beam_size = 0"),
      "damaged_shard": ("evaluate.py", f"--checkpoint={tmp / 'plug'}", "--task=review_sentiment_zero_shot",
                        f"--data_dir={shard.parents[2]}", f"--output={tmp / 'result.json'}"),
      "other_shape": (generate[0], f"--checkpoint={tmp / 'plug_shape'}", *generate[2:]),
      "other_family_generate": (generate[0], f"--checkpoint={tmp / 'kg'}", *generate[2:]),
      "other_family_evaluate": ("evaluate.py", f"--checkpoint={tmp / 'plug'}", "--task=kg_query",
                                f"--input_file={tmp / 'queries.jsonl'}", f"--output={tmp / 'result.json'}"),
      "tokenizer_too_large": (*generate, f"--tokenizer={tmp / 'big_vocab.txt'}"),
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
    "empty_prompts": r"generate.py: {tmp}/empty.jsonl: no examples \(every line is empty\).$",
    "invalid_prompts": r"generate.py: {tmp}/invalid.jsonl:2: not valid JSON \(.*\); each line must be one JSON object.$",
    "temperature": r"generate.py: --temperature=0.0; expected > 0 \(or greedy=True\).$",
    "top_p_zero": r"generate.py: --top_p=0.0; expected in \(0, 1\].$",
    "top_p_above_one": r"generate.py: --top_p=1.5; expected in \(0, 1\].$",
    "top_k": r"generate.py: --top_k=-1; expected >= 0 \(0 disables it\).$",
    "max_new_tokens": r"generate.py: --max_new_tokens=0; expected >= 1.$",
    "beam_size": r"generate.py: --beam_size=-2; expected >= 1.$",
    "suppress_tokens": r"generate.py: --suppress_tokens=\[3, -1\]; expected token ids >= 0.$",
    "evaluate_temperature": r"evaluate.py: SamplingConfig.temperature=0.0; expected > 0 \(or greedy=True\).$",
    "evaluate_beams": r"evaluate.py: BeamSearchConfig.beam_size=0; expected >= 1.$",
    "damaged_shard": r"evaluate.py: {tmp}/tfds_damaged/review_sentiment/.*/review_sentiment-test.array_record-00000-of-"
                     r"00001: a damaged shard of dataset 'review_sentiment' \(.+\); rebuild the dataset",
    "other_shape": r"generate.py: params checkpoint {tmp}/plug_shape: parameter '[\w/]+' has shape \(.*\) in the "
                   r"checkpoint but \(.*\) in the configured model.$",
    "other_family_generate": r"generate.py: {tmp}/kg/metadata.json: holds a 'kg' model, which serves kg tasks; "
                             r"generate.py needs a model that serves text tasks.$",
    "other_family_evaluate": r"evaluate.py: {tmp}/plug/metadata.json: holds a 'plug' model, which serves text tasks; "
                             r"--task=kg_query needs a model that serves kg tasks.$",
    "tokenizer_too_large": r"generate.py: the tokenizer \(--tokenizer, or the one the checkpoint records\): "
                           r"{tmp}/big_vocab.txt has 45 tokens, more than the model's vocab_size 32 ",
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
  assert not (tmp / "out.jsonl").exists() and not (tmp / "result.json").exists()


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
