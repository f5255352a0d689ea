"""Decode throughput of two checkouts of cpm_jax, in alternating processes (e.g. before and after a restructuring).

Each round runs one process per checkout, in turn; a process imports that checkout's cpm_jax (PYTHONPATH), builds
cpm_small (random weights, seed 0), converts it to the decode layout and times greedy decoding of 64 tokens after a
32-token prompt at batch 1 and 8 (best of --repeats calls after a warm-up). Both checkouts must have
`cpm_jax.models.cpm.init` and `.decode_layout`; the generate function of each is named by --generate_a / _b
(`generate(decode_params, prompts, config, SamplingConfig, eod_id=, pad_id=)`: before the family restructuring it
was cpm_jax.decoding.generate). Prints each round, the paired medians and the load average.

  .venv/bin/python benchmarks/decode_ab.py --a=/work/wt-base --generate_a=cpm_jax.decoding:generate --b=. \
      --rounds=5
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_string("a", None, "Checkout A (its root holds cpm_jax/).", required=True)
flags.DEFINE_string("b", ".", "Checkout B.")
flags.DEFINE_string("generate_a", "cpm_jax.models.cpm:generate", "module:function that generates in checkout A.")
flags.DEFINE_string("generate_b", "cpm_jax.models.cpm:generate", "module:function that generates in checkout B.")
flags.DEFINE_string("generate", None, "Internal: the child's generate function.")
flags.DEFINE_integer("rounds", 5, "Rounds; each runs A then B (B then A in odd rounds).")
flags.DEFINE_integer("repeats", 3, "Timed calls per batch size in each process.")
flags.DEFINE_bool("child", False, "Internal: time this process's cpm_jax and print JSON.")
FLAGS = flags.FLAGS
BATCHES = (1, 8)


def child() -> None:
  import importlib

  import jax
  import numpy as np

  from cpm_jax import decoding
  from cpm_jax.models import cpm

  module, function = FLAGS.generate.split(":")
  generate = getattr(importlib.import_module(module), function)
  config = cpm.CPMConfig(dropout_rate=0.0)
  params = cpm.decode_layout(cpm.init(config, jax.random.key(0)))
  greedy = decoding.SamplingConfig(max_new_tokens=64, greedy=True)
  result = {}
  for batch in BATCHES:
    prompts = np.random.default_rng(batch).integers(10, config.vocab_size, (batch, 32)).tolist()
    run = lambda: generate(params, prompts, config, greedy, eod_id=-1, pad_id=5)  # noqa: E731
    run()
    times = []
    for _ in range(FLAGS.repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    result[f"batch {batch}"] = batch * 64 / min(times)
  print(json.dumps(result))


def measure(checkout: str, generate: str) -> dict:
  env = {**os.environ, "PYTHONPATH": os.path.abspath(checkout), "XLA_FLAGS": ""}
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--a=unused", f"--generate={generate}",
                        f"--repeats={FLAGS.repeats}"], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if FLAGS.child:
    child()
    return
  rows = {"a": [], "b": []}
  loads = []
  for round_index in range(FLAGS.rounds):
    order = ("a", "b") if round_index % 2 == 0 else ("b", "a")
    for side in order:
      loads.append(os.getloadavg()[0])
      rows[side].append(measure(getattr(FLAGS, side), getattr(FLAGS, f"generate_{side}")))
    print(f"round {round_index + 1}: " + "; ".join(
        f"{key}: A {rows['a'][-1][key]:.1f}, B {rows['b'][-1][key]:.1f} tokens/s" for key in rows["a"][-1]),
          flush=True)
  print(f"A = {FLAGS.a}, B = {FLAGS.b}; load average {min(loads):.1f}-{max(loads):.1f}")
  for key in rows["a"][0]:
    ratios = [b[key] / a[key] for a, b in zip(rows["a"], rows["b"])]
    print(f"{key}: median A {statistics.median(r[key] for r in rows['a']):.1f}, B "
          f"{statistics.median(r[key] for r in rows['b']):.1f} tokens/s; paired B / A ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)}, median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
  app.run(main)
