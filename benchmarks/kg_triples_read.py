"""Reading a kg_triples split: records of BLOCK_TRIPLES triples (the format) against one record per triple.

A synthetic triple file (numpy Generator(seed)) is built twice as a kg_triples dataset, once with the format's blocks
of triples per record and once with one record per triple (what kg_triples 1.0.0 stored), and
`kg.data.load_triples` reads each split back (the best of `rounds` reads); the two arrays must be equal (the same
triples in file order). Printed: seconds, microseconds per triple, the speed-up, and what reading Wikidata's
477,598,890 triples would take at each rate.

  .venv/bin/python benchmarks/kg_triples_read.py
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("num_triples", 200_000, "Triples in the synthetic train.txt.")
flags.DEFINE_integer("rounds", 3, "Reads of each dataset; the fastest is reported.")
flags.DEFINE_integer("seed", 0, "Triple file seed.")
FLAGS = flags.FLAGS

WIKIDATA_TRIPLES = 477_598_890


def main(_):
  from cpm_jax.data import triples
  from cpm_jax.models.kg import data

  print(f"load average {os.getloadavg()}")
  ids = np.random.default_rng(FLAGS.seed).integers(0, 100_000, (FLAGS.num_triples, 3))
  with tempfile.TemporaryDirectory() as folder:
    with open(os.path.join(folder, "train.txt"), "w", encoding="utf-8") as f:
      f.writelines(f"e{h}\tr{r % 500}\te{t}\n" for h, r, t in ids)
    seconds, arrays = {}, {}
    for name, block in (("blocks", triples.BLOCK_TRIPLES), ("one_per_record", 1)):
      begin = time.perf_counter()
      triples.build_triples_dataset(folder, os.path.join(folder, "tfds"), name=name, block_triples=block)
      print(f"{name}: built {FLAGS.num_triples:,} triples, {block:,} per record, in {time.perf_counter() - begin:.1f} s")
      times = []
      for _ in range(FLAGS.rounds):
        begin = time.perf_counter()
        arrays[name] = data.load_triples(f"kg_triples/{name}", "train", os.path.join(folder, "tfds"))
        times.append(time.perf_counter() - begin)
      seconds[name] = min(times)
  if not np.array_equal(arrays["blocks"], arrays["one_per_record"]):
    raise SystemExit("the two datasets read back different triples")
  for name, value in seconds.items():
    per_triple = value / FLAGS.num_triples
    print(f"{name}: read in {value:.3f} s, {per_triple * 1e6:.2f} us a triple; Wikidata's "
          f"{WIKIDATA_TRIPLES:,} would take {per_triple * WIKIDATA_TRIPLES / 3600:.2f} h")
  print(f"blocks read {seconds['one_per_record'] / seconds['blocks']:.0f}x faster; same triples, same order; "
        f"load average {os.getloadavg()}")


if __name__ == "__main__":
  app.run(main)
