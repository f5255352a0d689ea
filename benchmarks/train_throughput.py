"""Training throughput of cpm_jax against transformers' GPT2LMHeadModel (PyTorch), same machine, same run.

cpm_small shape (12 layers, 768 hidden, 12 heads, vocab 30000, 1024 positions, tanh-GELU, eps 1e-5),
batch 4 x 256 tokens, float32, one AdamW step with global-norm clipping on each side:
- cpm_jax: `training.make_sharded_steps` (what experiments/train.py runs) on a 1-device mesh;
- PyTorch: forward, cross-entropy over the same targets, backward, clip_grad_norm_, torch.optim.AdamW.
Both sides use the same thread count (XLA: one intra-op thread per core; torch.set_num_threads). Timing rounds
alternate between the two sides so that load from other processes hits both alike; the median round is
reported. FLOP/s use `CPMLanguageModel.flops_per_token` (the training log's MFU accounting) and are given as a
fraction of the machine's matmul peak, the best of several large jnp.dot sizes measured in this run. Last, every
matrix product of the step is timed as a bare jnp.matmul and torch.matmul: the step time each library's GEMMs
allow with no other work, i.e. the ceiling for cpm_jax on this machine.

Run without the 8-fake-device flag (plain `XLA_FLAGS` unset):
  .venv/bin/python benchmarks/train_throughput.py
"""

from __future__ import annotations

import math
import os
import statistics
import time

from absl import app, flags

from benchmark_timing import best_time

flags.DEFINE_integer("batch_size", 4, "Rows per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds (jax, then torch, in each).")
flags.DEFINE_integer("steps_per_round", 3, "Train steps timed per side per round.")
flags.DEFINE_float("dropout", 0.0, "Dropout rate on both sides (0 or e.g. 0.1).")
flags.DEFINE_integer("num_layers", 12, "Model shape: layers (cpm_small: 12).")
flags.DEFINE_integer("embed_dim", 768, "Model shape: hidden size (cpm_small: 768).")
flags.DEFINE_integer("num_heads", 12, "Model shape: heads (cpm_small: 12).")
flags.DEFINE_integer("vocab_size", 30000, "Model shape: vocabulary (cpm_small: 30000).")
FLAGS = flags.FLAGS

LEARNING_RATE, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.01, 1.0


def torch_matmul_flops(sizes=(1024, 2048, 3072), repeats: int = 3) -> float:
  """Best FLOP/s of a square float32 torch.matmul (the reference's own BLAS), for comparison."""
  import torch
  best = 0.0
  for n in sizes:
    a = torch.ones(n, n)
    torch.matmul(a, a)
    for _ in range(repeats):
      start = time.perf_counter()
      torch.matmul(a, a)
      best = max(best, 2 * n**3 / (time.perf_counter() - start))
  return best


def step_matmuls(config, batch_size: int, seq_len: int) -> list[tuple[tuple, tuple, bool, int]]:
  """Every matrix product of one train step as (lhs shape as stored, rhs shape, whether the lhs is used
  transposed, how many per step): per dense layer and for the tied head, the forward product, the input gradient
  and the weight gradient (x^T @ dy over the tokens, x stored [tokens, in]); per layer, the two attention
  products of the forward pass and their four gradients, batched over batch x heads. Their FLOPs add up to
  `CPMLanguageModel.flops_per_token` x tokens."""
  n, e, f, v, layers = batch_size * seq_len, config.embed_dim, config.ffn_dim, config.vocab_size, config.num_layers
  products = []
  for fan_in, fan_out, count in ((e, 3 * e, layers), (e, e, layers), (e, f, layers), (f, e, layers), (e, v, 1)):
    products += [((n, fan_in), (fan_in, fan_out), False, count),  # forward
                 ((n, fan_out), (fan_out, fan_in), False, count),  # input gradient
                 ((n, fan_in), (n, fan_out), True, count)]  # weight gradient
  heads, t, d = batch_size * config.num_heads, seq_len, config.head_dim
  products += [((heads, t, d), (heads, d, t), False, 3 * layers),  # q k^T, and the gradients of q and of k
               ((heads, t, t), (heads, t, d), False, 3 * layers)]  # p v, and the gradients of p and of v
  return products


def matmul_seconds(products, repeats: int = 3) -> tuple[float, float]:
  """Seconds per step of the step's matrix products alone, as bare jnp.matmul and torch.matmul (each product
  timed separately, best of `repeats`; a transposed lhs is a transposed view on both sides, as autodiff uses
  it): what each library's step would take if it did nothing else."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  rng = np.random.default_rng(0)
  plain, transposed_lhs = jax.jit(jnp.matmul), jax.jit(lambda a, b: a.T @ b)
  jax_total = torch_total = 0.0
  for lhs_shape, rhs_shape, transposed, count in products:
    a, b = rng.standard_normal(lhs_shape, np.float32), rng.standard_normal(rhs_shape, np.float32)
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    jax_matmul = transposed_lhs if transposed else plain
    jax_total += count * best_time(lambda: jax_matmul(ja, jb).block_until_ready(), repeats)
    torch_total += count * best_time(lambda: torch.matmul(ta.t() if transposed else ta, tb), repeats)
  return jax_total, torch_total


def make_batch(batch_size: int, seq_len: int, vocab: int):
  import numpy as np
  tokens = np.random.default_rng(0).integers(8, vocab, (batch_size, seq_len + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones((batch_size, seq_len), np.float32),
          "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()}


def jax_step(config, batch):
  """A function running one cpm_jax train step (state kept across calls), blocking until done."""
  import jax
  import optax
  from cpm_jax import partitioning, training
  from cpm_jax.models import cpm

  model = cpm.CPMLanguageModel(config)
  optimizer = training.make_optimizer(optax.constant_schedule(LEARNING_RATE), weight_decay=WEIGHT_DECAY,
                                      b1=BETAS[0], b2=BETAS[1], eps=EPS, clip_norm=CLIP)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.devices()[:1])
  steps = training.make_sharded_steps(model, optimizer, mesh, dropout=config.dropout_rate > 0)
  holder = {"state": training.create_train_state(model, optimizer, mesh, seed=0)}
  global_batch = training.global_batch(batch, mesh)

  def step():
    holder["state"], metrics = steps.train(holder["state"], global_batch)
    return float(metrics["loss"])
  return step, model


def torch_step(config, batch):
  """The same step in PyTorch: GPT2LMHeadModel, cross-entropy, backward, clip_grad_norm_, AdamW."""
  import torch
  import transformers

  torch.manual_seed(0)
  rate = config.dropout_rate
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=config.vocab_size, n_positions=config.max_positions, n_embd=config.embed_dim,
      n_layer=config.num_layers, n_head=config.num_heads, activation_function="gelu_new",
      layer_norm_epsilon=config.layer_norm_eps, resid_pdrop=rate, embd_pdrop=rate, attn_pdrop=rate,
      bos_token_id=None, eos_token_id=None)).train()
  decay = [p for n, p in hf.named_parameters() if p.dim() >= 2]
  no_decay = [p for n, p in hf.named_parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE, betas=BETAS, eps=EPS)
  inputs = torch.from_numpy(batch["inputs"]).long()
  targets = torch.from_numpy(batch["targets"]).long()

  def step():
    optimizer.zero_grad(set_to_none=True)
    logits = hf(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), CLIP)
    optimizer.step()
    return loss.item()
  return step


def timed(step, n: int) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) per step over n steps."""
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(n):
    step()
  return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


def main(argv):
  del argv
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit("Run without --xla_force_host_platform_device_count: fake devices share the cores.")
  import jax
  import torch

  from cpm_jax import flops
  from cpm_jax.models import cpm

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  config = cpm.CPMConfig(vocab_size=FLAGS.vocab_size, num_layers=FLAGS.num_layers, embed_dim=FLAGS.embed_dim,
                         num_heads=FLAGS.num_heads, dropout_rate=FLAGS.dropout)
  batch = make_batch(FLAGS.batch_size, FLAGS.seq_len, config.vocab_size)
  tokens = FLAGS.batch_size * FLAGS.seq_len

  jax_train, model = jax_step(config, batch)
  pt_train = torch_step(config, batch)
  flops_per_step = model.flops_per_token(FLAGS.seq_len) * tokens
  print(f"model: {config.num_layers} layers x {config.embed_dim}, vocab {config.vocab_size}; batch "
        f"{FLAGS.batch_size} x {FLAGS.seq_len}; float32; dropout {FLAGS.dropout}; {jax.devices()[0].device_kind} "
        f"x {jax.device_count()} device; threads: XLA {threads} (one per core), torch {torch.get_num_threads()}; "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"FLOPs per step {flops_per_step / 1e9:.1f} G (6 x matmul params x tokens + 12 x L x E x T x tokens)")
  for _ in range(2):  # compile / warm up both
    jax_train(), pt_train()

  jax_peak = flops.measure_matmul_flops()
  torch_peak = torch_matmul_flops()
  jax_times, torch_times = [], []
  for _ in range(FLAGS.rounds):
    jax_times.append(timed(jax_train, FLAGS.steps_per_round))
    torch_times.append(timed(pt_train, FLAGS.steps_per_round))
  jax_peak = max(jax_peak, flops.measure_matmul_flops())
  torch_peak = max(torch_peak, torch_matmul_flops())

  print(f"matmul peak (best square float32 dot of 1024..3072): jnp.dot {jax_peak / 1e9:.0f} GFLOP/s, "
        f"torch.matmul {torch_peak / 1e9:.0f} GFLOP/s")
  print(f"{'':8} {'median s/step':>14} {'best s/step':>12} {'tokens/s':>9} {'GFLOP/s':>8} {'of jnp peak':>11} "
        f"{'CPU s/step':>10}")
  results = {}
  for name, times in (("cpm_jax", jax_times), ("pytorch", torch_times)):
    median = statistics.median(wall for wall, _ in times)
    results[name] = tokens / median
    print(f"{name:8} {median:14.3f} {min(wall for wall, _ in times):12.3f} {tokens / median:9.0f} "
          f"{flops_per_step / median / 1e9:8.0f} {flops_per_step / median / jax_peak:11.1%} "
          f"{statistics.median(cpu for _, cpu in times):10.2f}")
  print(f"ratio cpm_jax / pytorch tokens/s: {results['cpm_jax'] / results['pytorch']:.2f}x "
        f"(per round: {', '.join(f'{p[0] / j[0]:.2f}' for j, p in zip(jax_times, torch_times))}); "
        f"load average {os.getloadavg()[0]:.1f}")
  products = step_matmuls(config, FLAGS.batch_size, FLAGS.seq_len)
  product_flops = sum(count * 2 * math.prod(lhs) * rhs[-1] for lhs, rhs, _, count in products)
  jax_matmuls, torch_matmuls = matmul_seconds(products)
  print(f"the step's {len(products)} matmul shapes ({product_flops / 1e9:.1f} GFLOP) as bare matmuls, same run: "
        f"jnp {jax_matmuls:.3f} s/step ({flops_per_step / jax_matmuls / jax_peak:.0%} of jnp peak), torch "
        f"{torch_matmuls:.3f} s/step; jnp/torch matmul speed {torch_matmuls / jax_matmuls:.2f}")
  print(f"ceiling: with no work but its matmuls cpm_jax would run {tokens / jax_matmuls:.0f} tokens/s = "
        f"{tokens / jax_matmuls / results['pytorch']:.2f}x the PyTorch step measured above; it reaches "
        f"{jax_matmuls / statistics.median(wall for wall, _ in jax_times):.0%} of that ceiling")
  print("CPU s/step: the process's CPU time per step (all threads, busy-waiting included); unlike wall time it "
        "hardly depends on how much of the machine other processes take.")


if __name__ == "__main__":
  app.run(main)
