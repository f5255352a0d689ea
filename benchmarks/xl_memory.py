"""CPM-XL with memory against without, on the demo corpus: perplexity of the second and later segments of documents.

Trains gin_configs/experiments/cpm_xl_demo.gin twice through experiments/train.py (the shared train loop), once with
memory (CPMXLConfig.memory_length = segment length) and once without (0), same model size, data, seed and steps;
then scores People's Daily's validation split in the training rows (4 segments of 64 tokens) with each. A token
counts as "later" when its document began in an earlier segment of the row, so with memory it can see more of its
own document than its segment. Also scores the memory model with its memory switched off (same params). A workdir
that already holds a finished run is reused.

  .venv/bin/python benchmarks/xl_memory.py --data_dir=workdir/demo/tfds --tokenizer=workdir/demo/spm.model
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import subprocess
import sys

from absl import app, flags

flags.DEFINE_string("workdir", "/tmp/cpm_xl_memory", "Where the two runs train (memory/, no_memory/).")
flags.DEFINE_string("data_dir", "workdir/demo/tfds", "TFDS data_dir holding peoples_daily_1998 (scripts/demo.sh).")
flags.DEFINE_string("tokenizer", "workdir/demo/spm.model", "SentencePiece model (scripts/demo.sh trains one).")
flags.DEFINE_integer("vocab_size", 8000, "The tokenizer's vocabulary size.")
flags.DEFINE_integer("steps", 300, "Training steps of each run.")
flags.DEFINE_multi_string("gin_bindings", [], "More bindings for both runs, e.g. a size: "
                          "'CPMXLConfig.num_layers = 2' (default: cpm_xl_tiny.gin).")
flags.DEFINE_integer("eval_documents", 400, "Validation documents scored.")
FLAGS = flags.FLAGS
REPO = pathlib.Path(__file__).resolve().parents[1]


def train(workdir: pathlib.Path, memory_length: int) -> None:
  if (workdir / "final_metrics.json").exists():
    print(f"{workdir}: already trained")
    return
  bindings = [f"LMData.tokenizer_path = '{os.path.abspath(FLAGS.tokenizer)}'",
              f"LMData.data_dir = '{os.path.abspath(FLAGS.data_dir)}'", f"CPMXLConfig.vocab_size = {FLAGS.vocab_size}",
              f"CPMXLConfig.memory_length = {memory_length}", f"train.num_steps = {FLAGS.steps}",
              *FLAGS.gin_bindings,
              f"learning_rate_schedule.total_steps = {FLAGS.steps}"]
  subprocess.run([sys.executable, str(REPO / "experiments" / "train.py"), "--gin_file=experiments/cpm_xl_demo.gin",
                  f"--workdir={workdir}", *(f"--gin_bindings={b}" for b in bindings)], check=True, cwd=REPO)


def later_segment_weights(segment_ids, weights, segment_length: int):
  """1 for target tokens whose document (segment id) began in an earlier segment of the row."""
  import numpy as np

  columns = np.arange(segment_ids.shape[1])
  first = np.full(segment_ids.shape, segment_ids.shape[1])
  for row in range(segment_ids.shape[0]):
    for doc in np.unique(segment_ids[row][segment_ids[row] > 0]):
      where = segment_ids[row] == doc
      first[row, where] = columns[where].min()
  return weights * (columns[None] // segment_length > first // segment_length)


def score(checkpoint, config, batches) -> dict[str, float]:
  """Perplexity over all target tokens, those in their document's first segment of the row, and the later ones."""
  import jax
  import numpy as np

  from cpm_jax.models.cpm import xl

  forward = jax.jit(lambda params, b: xl.forward(params, b["inputs"], config, positions=b["positions"],
                                                 segment_ids=b["segment_ids"]))
  sums = {"all": [0.0, 0.0], "first segment": [0.0, 0.0], "later segments": [0.0, 0.0]}
  for batch in batches:
    logits = np.asarray(forward(checkpoint.params, batch), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    later = later_segment_weights(batch["segment_ids"], batch["weights"], config.segment_length)
    for name, weights in (("all", batch["weights"]), ("first segment", batch["weights"] - later),
                          ("later segments", later)):
      sums[name][0] += float((nll * weights).sum())
      sums[name][1] += float(weights.sum())
  return {name: math.exp(total / max(count, 1)) for name, (total, count) in sums.items()} | {
      "later tokens": sums["later segments"][1]}


def main(argv):
  del argv
  from cpm_jax.evaluation import model as model_lib
  from cpm_jax.models import cpm

  root = pathlib.Path(FLAGS.workdir)
  runs = {"with memory": (root / "memory", 64), "without memory": (root / "no_memory", 0)}
  for workdir, memory in runs.values():
    train(workdir, memory)
  data = cpm.LMData(tokenizer_path=os.path.abspath(FLAGS.tokenizer), data_dir=os.path.abspath(FLAGS.data_dir),
                    seq_len=256, global_batch_size=8, eval_max_documents=FLAGS.eval_documents)
  batches = list(data.eval_batches())
  results = {}
  for name, (workdir, _) in runs.items():
    checkpoint = model_lib.load_checkpoint(workdir)
    results[name] = score(checkpoint, checkpoint.config, batches)
    if checkpoint.config.memory_length:
      results["with memory, switched off"] = score(checkpoint, dataclasses.replace(checkpoint.config,
                                                                                   memory_length=0), batches)
  later_tokens = int(results["with memory"]["later tokens"])
  print(f"validation: {FLAGS.eval_documents} documents of peoples_daily_1998 in rows of 4 x 64 tokens; "
        f"{later_tokens} target tokens in later segments; {checkpoint.config.num_layers} layers x "
        f"{checkpoint.config.embed_dim}, {FLAGS.steps} training steps of 8 x 256 tokens each")
  print(f"{'':28s} {'all':>8s} {'first segment':>14s} {'later segments':>15s}")
  for name, result in results.items():
    print(f"{name:28s} {result['all']:8.1f} {result['first segment']:14.1f} {result['later segments']:15.1f}")
  ratio = results["with memory"]["later segments"] / results["without memory"]["later segments"]
  print(f"later segments, with / without memory: {ratio:.3f}")


if __name__ == "__main__":
  app.run(main)
