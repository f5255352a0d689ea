"""Long greedy generations of cpm_jax: attention over the whole cache every step against the length-bucketed step
(`cpm.generate(bucketed=True)`: attention reads only the filled power-of-two part of the cache).

cpm_small shape (random weights), a 32-token prompt and --new_tokens (default 960: the cache holds 991 slots), batch
1 and 8. The two run in turn in every round (paired medians). Also prints what each step reads, counted from the
shapes: weight bytes, and the cache bytes its attention reads, on average over the generation.

  .venv/bin/python benchmarks/decode_long.py --new_tokens=960 --rounds=3
"""

from __future__ import annotations

import os
import statistics
import time

from absl import app, flags

flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
flags.DEFINE_integer("prompt_length", 32, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 960, "Tokens generated per row (no early stop).")
flags.DEFINE_integer("rounds", 3, "Timed rounds (whole cache, then bucketed, in each) after a warm-up.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import numpy as np

  from cpm_jax import decoding, serving_weights
  from cpm_jax.models import cpm

  config = cpm.CPMConfig(dropout_rate=0.0)
  params = cpm.decode_layout(cpm.init(config, jax.random.key(0)))
  greedy = decoding.SamplingConfig(max_new_tokens=FLAGS.new_tokens, greedy=True)
  weight_bytes = serving_weights.weight_bytes(params.tree)
  capacity = decoding.bucket_width(FLAGS.prompt_length, config.max_positions) - 1 + FLAGS.new_tokens
  spans = cpm.attention_spans(capacity)
  filled = np.arange(capacity - FLAGS.new_tokens, capacity) + 1  # slots filled at each step
  bucketed_reads = np.mean([spans[np.searchsorted(spans, n)] for n in filled])
  print(f"cpm_small, {weight_bytes / 1e6:.0f} MB float32 weights; prompt {FLAGS.prompt_length}, {FLAGS.new_tokens} new "
        f"tokens: a cache of {capacity} slots, spans {spans}; load average {os.getloadavg()[0]:.1f}")
  for batch in map(int, FLAGS.batch_sizes):
    per_slot = 2 * config.num_layers * batch * config.embed_dim * 4  # keys and values, every layer, float32
    prompts = np.random.default_rng(batch).integers(10, config.vocab_size, (batch, FLAGS.prompt_length)).tolist()
    runs = {name: (lambda bucketed=bucketed: cpm.generate(params, prompts, config, greedy, eod_id=-1, pad_id=5,
                                                          bucketed=bucketed))
            for name, bucketed in (("whole cache", False), ("bucketed", True))}
    outputs = {name: run() for name, run in runs.items()}  # warm-up (compilation)
    assert outputs["whole cache"] == outputs["bucketed"], "bucketed attention changed the tokens"
    times = {name: [] for name in runs}
    loads = []
    for _ in range(FLAGS.rounds):
      for name, run in runs.items():
        loads.append(os.getloadavg()[0])
        start = time.perf_counter()
        run()
        times[name].append(time.perf_counter() - start)
    ratios = [w / b for w, b in zip(times["whole cache"], times["bucketed"])]
    print(f"batch {batch}: per step weights {weight_bytes / 1e6:.0f} MB, attention reads "
          f"{capacity * per_slot / 1e6:.0f} MB (whole cache) or {bucketed_reads * per_slot / 1e6:.0f} MB on average (bucketed); "
          + ", ".join(f"{name} {batch * FLAGS.new_tokens / statistics.median(t):.1f} tokens/s" for name, t in
                      times.items())
          + f"; paired speed-ups {', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}x); "
          f"same tokens; load average {min(loads):.1f}-{max(loads):.1f}")


if __name__ == "__main__":
  app.run(main)
