"""Greedy decode throughput of cpm_jax.decoding against transformers' GPT2LMHeadModel.generate.

Same architecture (cpm_small shape unless overridden), same prompt (32 tokens), 64 new tokens, batch 1
and 8, float32 on CPU, PyTorch with one thread per core like XLA; cpm_jax decodes from params converted once to
its decode layout (as experiments/generate.py does). Also prints the physical limit at batch 1: every
weight is streamed once per token, so tokens/s <= (matrix-vector bandwidth) / (bytes of params); and at each batch
size an on-device loop of bare matrix products over the same weights, the ceiling of a decode step. cpm_jax,
transformers, the bare loop and the bandwidth probes run in turn in every timed round, so they meet the same load.
At batch 1 the rounds also time the streamed path (`cpm.stream`: a host loop over one jitted step, as generate.py
--stream), the same decoding with bfloat16, int8 and w8a8 weights (cpm_jax.serving_weights), and int8 matrix-vector
probes (XLA; PyTorch's int8 weight-only kernel `_weight_int8pack_mm`; XLA's int8 x int8 product).

  .venv/bin/python benchmarks/decode_throughput.py
"""

from __future__ import annotations

import os

from absl import app, flags

from benchmark_timing import best_time, best_times

flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
flags.DEFINE_integer("prompt_length", 32, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row (no early stop).")
flags.DEFINE_integer("repeats", 5, "Timed rounds per batch size, each running cpm_jax, transformers, the bare loop "
                     "and (batch 1) the bandwidth probes in turn (the best of each is reported).")
flags.DEFINE_integer("threads", os.cpu_count(), "PyTorch threads (XLA uses one per core).")
flags.DEFINE_integer("num_layers", 12, "Model shape: layers (cpm_small: 12).")
flags.DEFINE_integer("embed_dim", 768, "Model shape: hidden size (cpm_small: 768).")
flags.DEFINE_integer("num_heads", 12, "Model shape: heads (cpm_small: 12).")
FLAGS = flags.FLAGS


def matvec_products(times: int = 5) -> tuple[int, list]:
  """Bytes streamed by two calls that each run `times` batch-1 matrix-vector products over a 256 MB float32
  matrix: (XLA, PyTorch)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  matrix = np.random.default_rng(0).standard_normal((8192, 8192), dtype=np.float32)
  w, x = jnp.asarray(matrix), jnp.ones((1, 8192), jnp.float32)
  product = jax.jit(lambda x, w: x @ w)
  wt, xt = torch.from_numpy(matrix), torch.ones(1, 8192)

  def xla_products():
    for _ in range(times):
      product(x, w).block_until_ready()

  def torch_products():
    with torch.inference_mode():
      for _ in range(times):
        xt @ wt
  return times * matrix.nbytes, [xla_products, torch_products]


def int8_matvec_products(times: int = 5) -> tuple[int, list]:
  """Bytes streamed by three calls that each run `times` batch-1 products of a float32 vector with an 8192 x 8192
  int8 matrix (one scale per output row, float32 out): (XLA as layers.dense computes it, PyTorch's
  _weight_int8pack_mm, XLA with the vector quantised to int8 too and padded to the two rows YNNPACK's int8 x int8
  product takes: what a weight-and-activation int8 step could reach)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from cpm_jax import layers

  matrix, scale = layers.quantize_int8(jnp.asarray(np.random.default_rng(1).standard_normal((8192, 8192),
                                                                                               np.float32)), (1,))
  x = jnp.ones((1, 8192), jnp.float32)
  product = jax.jit(lambda x, w, s: jax.lax.dot_general(x, w.astype(x.dtype), (((1,), (1,)), ((), ()))) * s)
  wt, st, xt = torch.from_numpy(np.array(matrix)), torch.from_numpy(np.array(scale[:, 0])), torch.ones(1, 8192)

  @jax.jit
  def int8_activations(x, w, s):
    x = jnp.concatenate([x, x])  # YNNPACK takes no one-row dot (XLA's ynn_support.cc: m == 1)
    x_scale = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    x_int8 = jnp.round(x / x_scale).astype(jnp.int8)
    dot = jax.lax.dot_general(x_int8, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return (dot.astype(jnp.float32) * x_scale * s)[:1]

  def xla_products():
    for _ in range(times):
      product(x, matrix, scale[:, 0]).block_until_ready()

  def torch_products():
    with torch.inference_mode():
      for _ in range(times):
        torch.ops.aten._weight_int8pack_mm(xt, wt, st)

  def xla_int8_activation_products():
    for _ in range(times):
      int8_activations(x, matrix, scale[:, 0]).block_until_ready()
  return times * matrix.size, [xla_products, torch_products, xla_int8_activation_products]


def weight_streaming_loop(decode_params, steps: int, batch: int = 1):
  """A jitted on-device loop of bare matrix products of `batch` rows over every decode matmul's weights (per
  layer, plus the tied head) of params in the decode layout (`cpm.decode_layout`: [out, in]): the same weight bytes
  and matmul FLOPs per token as decoding, nothing else (the ceiling of a decode step in XLA)."""
  import math

  import jax
  import jax.numpy as jnp

  tree = decode_params.tree
  embed = tree["embed"]["wte"].shape[1]
  matrices = [part[f"{name}_weight"].reshape(math.prod(part[f"{name}_bias"].shape), -1)
              for block in tree["blocks"]
              for part, name in ((block["attn"], "qkv"), (block["attn"], "out"), (block["mlp"], "in"),
                                 (block["mlp"], "out"))]

  @jax.jit
  def run(matrices, wte):
    def body(_, x):
      for w in matrices:  # each product feeds the next, so none can be skipped
        x = x + jnp.einsum("bi,oi->bo", jnp.tile(x, (1, w.shape[1] // embed)), w)[:, :embed] * 1e-9
      return x + jnp.einsum("bi,oi->bo", x, wte)[:, :embed] * 1e-9
    return jax.lax.fori_loop(0, steps, body, jnp.ones((batch, embed)))
  return lambda: run(matrices, tree["embed"]["wte"]).block_until_ready()


def main(argv):
  del argv
  import jax
  import numpy as np
  import torch
  import transformers

  from cpm_jax import decoding, layers, serving_weights
  from cpm_jax.models import cpm

  torch.set_num_threads(FLAGS.threads)
  config = cpm.CPMConfig(num_layers=FLAGS.num_layers, embed_dim=FLAGS.embed_dim, num_heads=FLAGS.num_heads,
                         dropout_rate=0.0)
  params = cpm.init(config, jax.random.key(0))
  param_bytes = layers.count_params(params) * 4
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=config.vocab_size, n_positions=config.max_positions, n_embd=config.embed_dim,
      n_layer=config.num_layers, n_head=config.num_heads, activation_function="gelu_new",
      layer_norm_epsilon=config.layer_norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      bos_token_id=None, eos_token_id=None)).eval()
  greedy = decoding.SamplingConfig(max_new_tokens=FLAGS.new_tokens, greedy=True)
  new = FLAGS.new_tokens

  print(f"model: {config.num_layers} layers x {config.embed_dim}, {param_bytes / 1e6:.0f} MB float32 params; "
        f"prompt {FLAGS.prompt_length}, {new} new tokens, greedy; {FLAGS.threads} threads; "
        f"load average {os.getloadavg()[0]:.1f}")
  matrix_bytes, matvecs = matvec_products()
  convert = best_time(lambda: jax.block_until_ready(cpm.decode_layout(params)), FLAGS.repeats)
  decode_params = cpm.decode_layout(params)
  print(f"params converted once to the decode layout (cpm.decode_layout, {convert * 1e3:.0f} ms)")
  served = {weights: serving_weights.for_decoding(decode_params, weights, cpm.QUANTIZED)
            for weights in ("bfloat16", "int8", "w8a8")}
  print("weights: " + ", ".join(f"{name} {serving_weights.weight_bytes(tree) / 1e6:.0f} MB" for name, tree in (
      ("float32", decode_params.tree), *((w, p.tree) for w, p in served.items()))))
  int8_bytes, int8_matvecs = int8_matvec_products()
  for batch in map(int, FLAGS.batch_sizes):
    prompts = np.random.default_rng(batch).integers(10, config.vocab_size, (batch, FLAGS.prompt_length))
    inputs = torch.from_numpy(prompts)

    def transformers_generate():
      with torch.inference_mode():
        hf.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=new,
                    min_new_tokens=new, pad_token_id=0)

    def generate(params):
      return lambda: cpm.generate(params, prompts.tolist(), config, greedy, eod_id=-1, pad_id=5)

    batch_1 = []
    if batch == 1:
      batch_1 = [lambda: list(cpm.stream(decode_params, prompts.tolist(), config, greedy, eod_id=-1, pad_id=5)),
                 *(generate(p) for p in served.values()), *matvecs, *int8_matvecs]
    ours, theirs, bare, *extra = best_times([
        generate(decode_params), transformers_generate, weight_streaming_loop(decode_params, new, batch), *batch_1],
        FLAGS.repeats)
    ours_tps, theirs_tps, bare_tps = batch * new / ours, batch * new / theirs, batch * new / bare
    line = (f"batch {batch}: cpm_jax {ours_tps:.1f} tokens/s, transformers {theirs_tps:.1f} tokens/s, "
            f"ratio {ours_tps / theirs_tps:.2f}x; bare matmul loop {bare_tps:.1f} tokens/s (the ceiling: "
            f"{bare_tps / theirs_tps:.2f}x transformers), cpm_jax reaches {bare / ours:.2f} of it")
    if extra:
      streamed, bf16, int8, w8a8, xla_probe, torch_probe, *int8_probes = extra
      xla_int8_probe, torch_int8_probe, int8_activations_probe = int8_probes
      xla_bandwidth, torch_bandwidth = matrix_bytes / xla_probe, matrix_bytes / torch_probe
      limit = xla_bandwidth / param_bytes
      line += (f"; matvec bandwidth XLA {xla_bandwidth / 1e9:.1f} GB/s, PyTorch {torch_bandwidth / 1e9:.1f} GB/s -> "
               f"weight-streaming limit {limit:.1f} tokens/s, cpm_jax reaches {100 * ours_tps / limit:.0f}% of it")
      line += (f"\n  streamed (host loop over a jitted step) {new / streamed:.1f} tokens/s ({ours / streamed:.2f} of "
               f"the on-device loop); bfloat16 weights {new / bf16:.1f} tokens/s ({ours / bf16:.2f}x float32), int8 "
               f"{new / int8:.1f} tokens/s ({ours / int8:.2f}x float32, {theirs / int8:.2f}x transformers), w8a8 "
               f"(int8 activations too) {new / w8a8:.1f} tokens/s ({ours / w8a8:.2f}x float32, {theirs / w8a8:.2f}x "
               f"transformers, {100 * new / w8a8 / limit:.0f}% of the float32 limit)"
               f"\n  int8 matvec of 8192 x 8192 (the ceiling of int8 decoding): XLA {xla_probe / xla_int8_probe:.2f}x "
               f"the float32 product's speed ({int8_bytes / xla_int8_probe / 1e9:.2f} GB/s of int8), PyTorch "
               f"_weight_int8pack_mm {torch_probe / torch_int8_probe:.2f}x its float32 product; XLA with int8 "
               f"activations (YNNPACK, 2 rows) {xla_probe / int8_activations_probe:.2f}x the float32 product")
    print(line)


if __name__ == "__main__":
  app.run(main)
