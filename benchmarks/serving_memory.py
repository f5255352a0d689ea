"""Memory of generation with CPM at a given size (default cpm_large), from abstract shapes only (nothing is
allocated): the served weights (float32, bfloat16, int8 by cpm_jax.serving_weights), the decode cache of a batch at
the model's positions, and the largest step buffers, against a GPU's memory.

  .venv/bin/python benchmarks/serving_memory.py --gin_file=models/cpm_large.gin --gpu_gib=24
"""

from __future__ import annotations

from absl import app, flags

flags.DEFINE_multi_string("gin_file", ["models/cpm_large.gin"], "Model gin files (relative to gin_configs/).")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes of the cache.")
flags.DEFINE_float("gpu_gib", 24.0, "GPU memory to compare against (GiB).")
FLAGS = flags.FLAGS
GIB = 1024 ** 3


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  from cpm_jax import gin_setup, layers, serving_weights
  from cpm_jax.models import cpm

  gin_setup.parse(FLAGS.gin_file, [])
  config = cpm.CPMConfig()
  abstract = cpm.abstract_params(config)
  print(f"{FLAGS.gin_file}: {config.num_layers} layers x {config.embed_dim}, {layers.count_params(abstract):,} params, "
        f"{config.max_positions} positions; GPU {FLAGS.gpu_gib:.0f} GiB")
  decode = jax.eval_shape(cpm.decode_layout, abstract)
  print(f"{'weights / compute':20s} {'weights GiB':>12s}" + "".join(f" {'+ cache, batch ' + b:>18s}"
                                                                     for b in FLAGS.batch_sizes) + "   fits")
  for weights, compute in (("float32", "float32"), ("bfloat16", "bfloat16"), ("int8", "bfloat16"),
                           ("int8", "float32")):
    served = jax.eval_shape(lambda p, w=weights: serving_weights.for_decoding(p, w, cpm.QUANTIZED), decode)
    weight_bytes = serving_weights.weight_bytes(served.tree)
    totals = []
    for batch in map(int, FLAGS.batch_sizes):
      cache = jax.eval_shape(lambda b=batch: cpm.init_cache(config, b, config.max_positions, jnp.dtype(compute)))
      # A step's largest buffers: the float32 logits and the MLP activations of the batch (a few MB at most).
      step = batch * (config.vocab_size * 4 + config.ffn_dim * jnp.dtype(compute).itemsize * 2)
      totals.append(weight_bytes + serving_weights.weight_bytes(cache) + step)
    fits = ", ".join(f"batch {b}: {'yes' if t <= FLAGS.gpu_gib * GIB else 'no'}" for b, t in zip(
        FLAGS.batch_sizes, totals))
    print(f"{weights + ' / ' + compute:20s} {weight_bytes / GIB:12.2f}" + "".join(f" {t / GIB:18.2f}"
                                                                                  for t in totals) + f"   {fits}")
  conversion = serving_weights.weight_bytes(abstract) + serving_weights.weight_bytes(decode.tree)
  print(f"Loading and converting on the GPU (generate.py) briefly holds the float32 params in the training layout and "
        f"in the decode layout: {conversion / GIB:.1f} GiB, plus the served copy being made.")


if __name__ == "__main__":
  app.run(main)
