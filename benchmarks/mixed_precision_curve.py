r"""float32 against bfloat16 compute (float32 master weights) on the demo corpus: loss curves and step times.

Both runs start from the same initial params and read the same batches in the same order; their steps alternate in
one process, so the step times meet the same load. Prints both training losses every --log_every steps, the
largest and the mean gap over the run, and the validation loss of both at the end.

  .venv/bin/python benchmarks/mixed_precision_curve.py --data_dir=/tmp/tfds --tokenizer=/tmp/cpm_demo/spm.model

The demo corpus and tokenizer come from experiments/train_tokenizer.py and experiments/build_datasets.py
(BUILD.md, Data).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import time

from absl import app, flags

flags.DEFINE_string("data_dir", None, "TFDS directory holding the demo corpus (build_datasets.py).", required=True)
flags.DEFINE_string("tokenizer", None, "SentencePiece model (train_tokenizer.py); sets the vocabulary size.",
                    required=True)
flags.DEFINE_string("model", "cpm_small", "Model shape: a gin_configs/models/<name>.gin file.")
flags.DEFINE_integer("steps", 200, "Train steps per run.")
flags.DEFINE_integer("batch_size", 4, "Rows per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
flags.DEFINE_float("learning_rate", 3e-4, "Peak learning rate (linear warm-up, cosine decay).")
flags.DEFINE_integer("warmup_steps", 20, "Warm-up steps.")
flags.DEFINE_integer("eval_batches", 20, "Validation batches for the final loss.")
flags.DEFINE_integer("log_every", 10, "Print both losses every this many steps.")
FLAGS = flags.FLAGS

DTYPES = ("float32", "bfloat16")
REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv):
  del argv
  import gin
  import jax
  import numpy as np

  from cpm_jax import partitioning, training
  from cpm_jax.models import cpm

  data = cpm.LMData(tokenizer_path=FLAGS.tokenizer, data_dir=FLAGS.data_dir, seq_len=FLAGS.seq_len,
                    global_batch_size=FLAGS.batch_size)
  vocab_size = data.tokenizer.vocab_size
  iterator = data.train_iterator(seed=0)
  batches = [next(iterator) for _ in range(FLAGS.steps)]
  eval_batches = [batch for batch, _ in zip(data.eval_batches(), range(FLAGS.eval_batches))]

  gin.parse_config_file(str(REPO / "gin_configs" / "models" / f"{FLAGS.model}.gin"))
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.devices()[:1])
  optimizer = training.make_optimizer(training.learning_rate_schedule(FLAGS.learning_rate, FLAGS.warmup_steps,
                                                                      FLAGS.steps))
  runs = {}
  for dtype in DTYPES:
    model = cpm.CPMLanguageModel(cpm.CPMConfig(vocab_size=vocab_size, dropout_rate=0.0, dtype=dtype))
    steps = training.make_sharded_steps(model, optimizer, mesh, dropout=False)
    runs[dtype] = {"steps": steps, "state": training.create_train_state(model, optimizer, mesh, seed=0),
                   "losses": [], "times": []}
  config = model.config
  print(f"model {FLAGS.model}: {config.num_layers} x {config.embed_dim}, vocab {vocab_size}; batch {FLAGS.batch_size} "
        f"x {FLAGS.seq_len}; {FLAGS.steps} steps, peak lr {FLAGS.learning_rate}; load average "
        f"{os.getloadavg()[0]:.1f}")
  print(f"{'step':>5} " + " ".join(f"{dtype:>9}" for dtype in DTYPES) + f" {'gap':>8}")
  for index, batch in enumerate(batches):
    for dtype, run in runs.items():
      start = time.perf_counter()
      run["state"], metrics = run["steps"].train(run["state"], training.global_batch(batch, mesh))
      run["losses"].append(float(metrics["loss"]))
      run["times"].append(time.perf_counter() - start)
    if (index + 1) % FLAGS.log_every == 0 or index == 0:
      losses = [runs[dtype]["losses"][-1] for dtype in DTYPES]
      print(f"{index + 1:5d} " + " ".join(f"{loss:9.4f}" for loss in losses) + f" {losses[1] - losses[0]:+8.4f}",
            flush=True)

  gaps = np.abs(np.subtract(runs["bfloat16"]["losses"], runs["float32"]["losses"]))
  tail = gaps[len(gaps) // 2:]
  print(f"|bf16 - f32| training loss: max {gaps.max():.4f} (step {gaps.argmax() + 1}), mean {gaps.mean():.4f}; "
        f"second half max {tail.max():.4f}, mean {tail.mean():.4f}")
  for dtype, run in runs.items():
    sums = [run["steps"].evaluate(run["state"].params, training.global_batch(batch, mesh)) for batch in eval_batches]
    eval_loss = sum(float(s["loss_sum"]) for s in sums) / sum(float(s["weight_sum"]) for s in sums)
    print(f"{dtype:9}: validation loss {eval_loss:.4f} ({len(eval_batches)} batches); median step "
          f"{statistics.median(run['times'][1:]):.3f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
