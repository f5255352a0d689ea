r"""The few-shot table: every system of a TableSpec gin file trained on FewCLUE-style samples over the seeds and
evaluated on the task's test split, with CPM label-prompt baselines and the majority class.

  python experiments/fewshot.py --gin_file=experiments/fewshot_review_sentiment.gin --workdir=/tmp/fewshot \
      --vocab=../shared/vocab/plug/vocab.txt --data_dir=/tmp/tfds

First it trains what the systems start from, unless given: the PLUG encoder (stage 1, experiments/
plug_stage1_demo.gin, into WORKDIR/stage1; --pretrained=DIR takes a stage-1 workdir or a converted checkpoint instead)
and, for the label-prompt rows, a CPM (a SentencePiece vocab and experiments/cpm_demo.gin into WORKDIR/cpm;
--cpm=DIR takes another, e.g. scripts/demo.sh's workdir/demo/cpm). Writes WORKDIR/table.json (the rows with their
per-seed numbers, every run's metrics, timings, load averages) and WORKDIR/table.md, and prints the table.
--rows='LABEL' (repeatable) computes only those rows (labels as in the table); table.json holds every row on disk.
Finished seeds of each system (WORKDIR/systems/<name>/runs.json) and CPM rows (WORKDIR/label_prompts.json) are read
back when the command runs again. SIGTERM (or Ctrl-C) stops it at the next seed, training or baseline, a training
under way saving first; the last line says where, and the same command resumes there.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import gin
import jax
from absl import flags, logging

from cpm_jax import checkpointing, gin_setup, programs, tokenization, train_loop
from cpm_jax.data import corpus
from cpm_jax.fewshot import table as table_lib
from cpm_jax.models import registry  # noqa: F401  (every family's gin configurables)

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "The table's gin file(s) (binding TableSpec).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Bindings for the table and every system, e.g. "
                                          "'TableSpec.seeds = (0, 1)'.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where pre-training, every system's runs and the table go.",
                               required=True)
_VOCAB = flags.DEFINE_string("vocab", "../shared/vocab/plug/vocab.txt", "The BERT-Chinese vocab.txt.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/tensorflow_datasets", "TFDS data_dir (demo datasets built on use).")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "The encoder the systems start from; default: train stage 1.")
_CPM = flags.DEFINE_string("cpm", None, "The CPM checkpoint for the label-prompt rows; default: train the demo CPM.")
_CPM_VOCAB_SIZE = flags.DEFINE_integer("cpm_vocab_size", 8000, "SentencePiece pieces of the CPM trained here.")
_ROWS = flags.DEFINE_multi_string("rows", None, "Compute only these rows of the table (their labels, e.g. "
                                   "'PET + R-Drop'); default: every row.")
_CACHE = flags.DEFINE_bool("compilation_cache", True, "Keep compiled programs in WORKDIR/jax_cache, so the seeds of "
                           "a system (same programs) compile once.")


def _train(workdir: str, files: list[str], bindings: list[str]) -> str:
  """The train loop on a recipe (resumes; a finished run is left as it is)."""
  gin.clear_config()
  try:
    gin_setup.parse(files, bindings + ["train.peak_flops = 1e12"])
    table_lib.finished(train_loop.train(workdir), workdir)
  finally:
    gin.clear_config()
  return workdir


def _stage1(workdir: str) -> str:
  return _train(os.path.join(workdir, "stage1"), ["experiments/plug_stage1_demo.gin"],
                [f'StructBertData.vocab_path = "{_VOCAB.value}"', f'StructBertData.data_dir = "{_DATA_DIR.value}"'])


def _cpm(workdir: str) -> str:
  spm = os.path.join(workdir, "cpm_spm.model")
  if not os.path.exists(spm):
    tokenization.train_sentencepiece(corpus.peoples_daily_paragraphs()[:6000], spm, vocab_size=_CPM_VOCAB_SIZE.value)
  return _train(os.path.join(workdir, "cpm"), ["experiments/cpm_demo.gin"],
                [f'LMData.tokenizer_path = "{spm}"', f'LMData.data_dir = "{_DATA_DIR.value}"',
                 f"CPMConfig.vocab_size = {_CPM_VOCAB_SIZE.value}"])


def _table(workdir: str, guard: checkpointing.PreemptionGuard) -> dict:
  """Trains what the selected rows start from (unless given), then runs the table."""
  common = [f'FewShotData.vocab_path = "{_VOCAB.value}"', f'FewShotTask.data_dir = "{_DATA_DIR.value}"']
  gin.clear_config()
  gin_setup.parse(_GIN_FILES.value, common + _GIN_BINDINGS.value)
  spec = table_lib.TableSpec()
  gin.clear_config()
  selected = spec.selected(_ROWS.value)
  needs_systems = any(row[0] in selected for row in spec.rows)
  pretrained = _PRETRAINED.value or (_stage1(workdir) if needs_systems else None)
  cpm = _CPM.value
  if cpm is None and any(label in selected for label in spec.label_prompt_rows):
    table_lib.stop_if_requested(guard, "the CPM's training")
    cpm = _cpm(workdir)
  common.append(f'RestoreCheckpointConfig.path = "{pretrained}"')
  spec = dataclasses.replace(spec, systems=tuple((name, files, (*common, *_GIN_BINDINGS.value, *bindings))
                                                 for name, files, bindings in spec.systems))
  logging.info("Few-shot table: %d rows of %d systems x seeds %s into %s.", len(selected), len(spec.systems),
               spec.seeds, workdir)
  return table_lib.run_table(spec, workdir, label_prompt_checkpoint=cpm, rows=_ROWS.value)


def main(argv):
  del argv
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  with checkpointing.PreemptionGuard() as guard:
    try:
      result = _table(workdir, guard)
    except table_lib.Preempted as e:
      print(f"fewshot.py: stopped on {guard.signal_name} {e}; {workdir}/table.json holds what is complete; run the "
            "same command again to resume.", file=sys.stderr, flush=True)
      sys.exit(130 if guard.signal_name == "SIGINT" else 0)
  print(table_lib.markdown(result))
  print(f"{result['seconds']:.0f} s; load average {result['load_average']}; {workdir}/table.json")


if __name__ == "__main__":
  programs.run(main, user_errors=(train_loop.TrainingDiverged,))
