r"""Training throughput of cpm_jax against a plain Flax model and transformers' GPT2LMHeadModel (PyTorch).

One full train step on each side, the same model shape (cpm_small by default: 12 layers, 768 hidden, 12 heads,
vocab 30000, 1024 positions, tanh-GELU, LayerNorm eps 1e-5, output head tied to the word embedding, causal
attention), batch 4 x 256 tokens, dropout 0, one AdamW step with global-norm clipping:
- cpm_jax: `training.make_sharded_steps` (what experiments/train.py runs) on a 1-device mesh;
- flax: the straightforward way, written here: flax.linen (nn.Embed with `attend` for the tied head,
  nn.MultiHeadDotProductAttention with a causal mask, nn.Dense, nn.LayerNorm, a Python loop over the blocks),
  optax softmax cross-entropy, optax.clip_by_global_norm + optax.adamw, jit with the state donated;
- pytorch: forward, cross-entropy, backward, clip_grad_norm_, torch.optim.AdamW (torch.autocast for bfloat16).

Each side is timed two ways and both are printed:
- alone: a fresh process per side (`--side=NAME`), the processes rotated over `--alone_rounds` rounds;
- interleaved: all sides in one process, taking turns within every round (what real training meets when
  evaluation, checkpointing or a notebook's other cells share the process).
Medians over steps and rounds, with the process CPU seconds per step (it depends far less than wall time on
other processes' load) and the minor page faults per step. For the JAX sides the compiled step's temporary
bytes and its copy / transpose instructions are printed too: deterministic evidence, unlike any timing.

FLOPs follow the training log's MFU accounting (`CPMLanguageModel.flops_per_token`). On CPU they are given as a
fraction of the best square jnp.dot measured in the run, and the step's matrix products are timed as bare
jnp.matmul / torch.matmul (the ceiling: the step time each library's GEMMs allow with no other work). On a GPU or
TPU (`--platform=gpu|tpu`) the MFU is against the chip's published bfloat16 peak (cpm_jax.flops).

  .venv/bin/python benchmarks/train_throughput.py                       # float32, cpm_small, all three sides
  .venv/bin/python benchmarks/train_throughput.py --dtype=bfloat16      # bf16 compute, float32 master weights
  .venv/bin/python benchmarks/train_throughput.py --platform=gpu --model=cpm_large --batch_size=8 --seq_len=1024

Run without the tests' 8-fake-device flag (`XLA_FLAGS` unset).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app, flags

from benchmark_timing import best_time

SIDES = ("cpm_jax", "flax", "pytorch")
flags.DEFINE_enum("platform", "cpu", ["cpu", "gpu", "tpu"], "Where the JAX sides run (PyTorch: CPU only).")
flags.DEFINE_string("model", "cpm_small", "Model shape: a gin_configs/models/<name>.gin file (cpm_small, "
                    "cpm_medium, cpm_large).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype on every side; params stay float32. "
                  "Default: float32 on CPU, bfloat16 on accelerators.")
flags.DEFINE_integer("batch_size", 4, "Rows per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per row.")
flags.DEFINE_list("sides", None, f"Sides to time, of {SIDES}. Default: all on CPU, cpm_jax and flax elsewhere.")
flags.DEFINE_integer("alone_rounds", 2, "Rounds of fresh processes, one per side (0: skip the alone timing).")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds in one process (0: skip the interleaved timing).")
flags.DEFINE_integer("steps_per_round", 2, "Train steps timed per side per round (both ways).")
flags.DEFINE_float("dropout", 0.0, "Dropout rate on every side.")
flags.DEFINE_string("remat_policy", None, "cpm_jax's CPMConfig.remat_policy (default: the model gin's, else the "
                    "config's default).")
flags.DEFINE_string("attention_impl", None, "cpm_jax's CPMConfig.attention_impl (default: xla on CPU, cudnn on "
                    "GPU, xla on TPU).")
flags.DEFINE_bool("scan_layers", None, "cpm_jax's CPMConfig.scan_layers (default: the config's, a scan; False "
                  "unrolls the layers).")
flags.DEFINE_integer("num_microbatches", 1, "cpm_jax: gradient accumulation over this many microbatches.")
flags.DEFINE_bool("ceiling", True, "CPU: also time the step's matrix products as bare matmuls.")
flags.DEFINE_bool("retain_freed_memory", False, "Every process: cpm_jax.host_memory.retain_freed_memory() first "
                  "(glibc keeps freed memory for reuse, so XLA's per-step temporaries are not page-faulted anew).")
flags.DEFINE_list("checkouts", None, "Instead: time cpm_jax alone in each of these checkouts (repo roots, imported "
                  "through PYTHONPATH; this script and its model gin files as given), one fresh process per checkout, "
                  "rotated over --alone_rounds rounds; prints each one's medians and its ratios to the first.")
flags.DEFINE_string("side", None, "Internal: time this one side in this process and print its result as JSON.")
FLAGS = flags.FLAGS

LEARNING_RATE, BETAS, EPS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 1e-8, 0.01, 1.0
REPO = pathlib.Path(__file__).resolve().parents[1]
RESULT_PREFIX = "SIDE_RESULT "


@dataclasses.dataclass
class Side:
  """One side's train step (a call runs one step and blocks until it is done) and, for JAX, its compiled step."""

  step: Callable[[], float]
  compiled: Any = None


# ---- the model and the batch -------------------------------------------------------------------

def model_config():
  """The CPMConfig every side follows: --model's gin file, with the dtype, dropout and options of the flags."""
  import gin
  from cpm_jax.models import cpm

  gin.clear_config()
  gin.parse_config_file(str(REPO / "gin_configs" / "models" / f"{FLAGS.model}.gin"))
  overrides = {"dropout_rate": FLAGS.dropout, "dtype": compute_dtype(),
               "attention_impl": FLAGS.attention_impl or ("cudnn" if FLAGS.platform == "gpu" else "xla")}
  if FLAGS.remat_policy:
    overrides["remat_policy"] = FLAGS.remat_policy
  if FLAGS.scan_layers is not None:
    overrides["scan_layers"] = FLAGS.scan_layers
  return cpm.CPMConfig(**overrides)


def compute_dtype() -> str:
  return FLAGS.dtype or ("float32" if FLAGS.platform == "cpu" else "bfloat16")


def make_batch(batch_size: int, seq_len: int, vocab: int) -> dict:
  import numpy as np
  tokens = np.random.default_rng(0).integers(8, vocab, (batch_size, seq_len + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": np.ones((batch_size, seq_len), np.float32),
          "segment_ids": np.ones((batch_size, seq_len), np.int32),
          "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()}


# ---- the three sides ---------------------------------------------------------------------------

def cpm_jax_side(config, batch) -> Side:
  """cpm_jax's train step, as experiments/train.py runs it, on a 1-device mesh."""
  import jax
  import optax
  from cpm_jax import partitioning, training
  from cpm_jax.models import cpm

  model = cpm.CPMLanguageModel(config)
  optimizer = training.make_optimizer(optax.constant_schedule(LEARNING_RATE), weight_decay=WEIGHT_DECAY,
                                      b1=BETAS[0], b2=BETAS[1], eps=EPS, clip_norm=CLIP)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.devices()[:1])
  steps = training.make_sharded_steps(model, optimizer, mesh, dropout=config.dropout_rate > 0,
                                      num_microbatches=FLAGS.num_microbatches)
  state = training.create_train_state(model, optimizer, mesh, seed=0)
  global_batch = training.global_batch(batch, mesh)
  compiled = steps.train.lower(state, global_batch).compile()
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], global_batch)
    return float(metrics["loss"])
  return Side(step, compiled)


def flax_side(config, batch) -> Side:
  """The same model and step written the straightforward way with flax.linen and optax."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax

  dtype = jnp.dtype(config.dtype)
  init = nn.initializers.normal(config.init_stddev)
  out_init = nn.initializers.normal(config.init_stddev / math.sqrt(2 * config.num_layers))

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask, deterministic):
      h = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype)(x)
      h = nn.MultiHeadDotProductAttention(num_heads=config.num_heads, dtype=dtype, kernel_init=init,
                                          out_kernel_init=out_init, dropout_rate=config.dropout_rate)(
                                              h, mask=mask, deterministic=deterministic)
      x = x + nn.Dropout(config.dropout_rate)(h, deterministic)
      h = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype)(x)
      h = nn.gelu(nn.Dense(config.ffn_dim, dtype=dtype, kernel_init=init)(h), approximate=True)
      h = nn.Dense(config.embed_dim, dtype=dtype, kernel_init=out_init)(h)
      return x + nn.Dropout(config.dropout_rate)(h, deterministic)

  class LM(nn.Module):
    @nn.compact
    def __call__(self, tokens, deterministic=True):
      wte = nn.Embed(config.vocab_size, config.embed_dim, dtype=dtype, embedding_init=init)
      wpe = self.param("wpe", init, (config.max_positions, config.embed_dim))
      x = wte(tokens) + wpe[:tokens.shape[1]].astype(dtype)
      x = nn.Dropout(config.dropout_rate)(x, deterministic)
      mask = nn.make_causal_mask(tokens)
      for _ in range(config.num_layers):
        x = Block()(x, mask, deterministic)
      x = nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype)(x)
      return wte.attend(x).astype(jnp.float32)

  lm = LM()
  params = lm.init(jax.random.key(0), batch["inputs"])
  decay = jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LEARNING_RATE, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                                                weight_decay=WEIGHT_DECAY, mask=decay))
  deterministic = config.dropout_rate == 0

  def loss_fn(params, batch, rng):
    logits = lm.apply(params, batch["inputs"], deterministic, rngs={"dropout": rng})
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  def train_step(params, opt_state, rng, batch):
    rng, step_rng = jax.random.split(rng)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, step_rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, rng, loss

  holder = {"state": (params, tx.init(params), jax.random.key(1))}
  batch = jax.device_put(batch)
  compiled = jax.jit(train_step, donate_argnums=(0, 1, 2)).lower(*holder["state"], batch).compile()

  def step():
    *holder["state"], loss = compiled(*holder["state"], batch)
    return float(loss)
  return Side(step, compiled)


def pytorch_side(config, batch) -> Side:
  """The same step in PyTorch: GPT2LMHeadModel, cross-entropy, backward, clip_grad_norm_, AdamW."""
  import torch
  import transformers

  torch.manual_seed(0)
  rate = config.dropout_rate
  hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=config.vocab_size, n_positions=config.max_positions, n_embd=config.embed_dim,
      n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.ffn_dim, activation_function="gelu_new",
      layer_norm_epsilon=config.layer_norm_eps, resid_pdrop=rate, embd_pdrop=rate, attn_pdrop=rate,
      bos_token_id=None, eos_token_id=None)).train()
  decay = [p for p in hf.parameters() if p.dim() >= 2]
  no_decay = [p for p in hf.parameters() if p.dim() < 2]
  optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=LEARNING_RATE, betas=BETAS, eps=EPS)
  inputs = torch.from_numpy(batch["inputs"]).long()
  targets = torch.from_numpy(batch["targets"]).long()
  bfloat16 = config.dtype == "bfloat16"

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
      logits = hf(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), CLIP)
    optimizer.step()
    return loss.item()
  return Side(step)


BUILDERS = {"cpm_jax": cpm_jax_side, "flax": flax_side, "pytorch": pytorch_side}


# ---- timing --------------------------------------------------------------------------------------

def timed_steps(side: Side, n: int) -> list[tuple[float, float, int]]:
  """(wall seconds, process CPU seconds, minor page faults) of each of n steps."""
  out = []
  for _ in range(n):
    start, cpu, faults = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    side.step()
    out.append((time.perf_counter() - start, time.process_time() - cpu,
                resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
  return out


def build(names, config, batch) -> dict[str, Side]:
  sides = {name: BUILDERS[name](config, batch) for name in names}
  for side in sides.values():  # compile (PyTorch: allocate) and warm up
    side.step(), side.step()
  return sides


def run_alone(name: str, checkout: str | None = None) -> dict:
  """Times one side in a fresh process: `--side=name` with the same flags (cpm_jax imported from `checkout`, if
  given, else as this process imports it)."""
  passed = [f"--{flag}={getattr(FLAGS, flag)}" for flag in
            ("platform", "model", "batch_size", "seq_len", "steps_per_round", "dropout", "num_microbatches",
             "retain_freed_memory")]
  passed += [f"--dtype={compute_dtype()}"]
  passed += [f"--{flag}={getattr(FLAGS, flag)}" for flag in ("remat_policy", "attention_impl", "scan_layers")
             if getattr(FLAGS, flag) is not None]
  env = {**os.environ, "PYTHONPATH": checkout} if checkout else None
  done = subprocess.run([sys.executable, __file__, f"--side={name}", *passed], capture_output=True, text=True,
                        env=env)
  lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
  if done.returncode or not lines:
    raise SystemExit(f"--side={name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
  return json.loads(lines[-1][len(RESULT_PREFIX):])


def compiled_stats(compiled) -> str:
  """Temporary bytes of a compiled step and its copy / transpose instructions (optimized HLO)."""
  memory = compiled.memory_analysis()
  ops = re.findall(r"^\s*(?:ROOT )?%\S+ = [^=]*? ([a-z][a-z0-9-]*)\(", compiled.as_text(), re.MULTILINE)
  return (f"temporaries {memory.temp_size_in_bytes / 1e9:.2f} GB, {ops.count('copy')} copies, "
          f"{ops.count('transpose')} transposes (optimized HLO)")


# ---- the ceiling: the step's matrix products alone (CPU) -------------------------------------------

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


# ---- the report ----------------------------------------------------------------------------------

def summary(times: list[list[float]]) -> dict:
  """Medians of (wall, CPU, faults) per step over all timed steps."""
  return {"wall": statistics.median(t[0] for t in times), "cpu": statistics.median(t[1] for t in times),
          "faults": statistics.median(t[2] for t in times), "best": min(t[0] for t in times)}


def load() -> str:
  return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def compare_checkouts(checkouts: list[str]):
  """cpm_jax's step alone in each checkout, processes rotated: medians and ratios to the first checkout."""
  print(f"cpm_jax alone per checkout: model {FLAGS.model}, batch {FLAGS.batch_size} x {FLAGS.seq_len}, compute "
        f"{compute_dtype()}, {FLAGS.alone_rounds} rounds x {FLAGS.steps_per_round} steps; {load()}")
  times, remat = {checkout: [] for checkout in checkouts}, {}
  for round_index in range(FLAGS.alone_rounds):
    shift = round_index % len(checkouts)
    for checkout in checkouts[shift:] + checkouts[:shift]:
      result = run_alone("cpm_jax", os.path.abspath(checkout))
      times[checkout] += result["times"]
      remat[checkout] = result["remat_policy"]
      print(f"  round {round_index + 1}: {checkout:24} {statistics.median(t[0] for t in result['times']):7.3f} s/step, "
            f"loss {result['loss']:.4f}, load {result['load']:.1f}", flush=True)
  first = summary(times[checkouts[0]])
  print(f"{'checkout':24} {'remat':12} {'s/step':>8} {'best':>7} {'CPU s/step':>10} {'faults/step':>11} "
        f"{'wall ratio':>10} {'CPU ratio':>9}  (ratio: the first checkout's time / this one's)")
  for checkout in checkouts:
    s = summary(times[checkout])
    print(f"{checkout:24} {remat[checkout]:12} {s['wall']:8.3f} {s['best']:7.3f} {s['cpu']:10.2f} {s['faults']:11.0f} "
          f"{first['wall'] / s['wall']:10.2f} {first['cpu'] / s['cpu']:9.2f}")
  print(f"done; {load()}")


def main(argv):
  del argv
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit("Run without --xla_force_host_platform_device_count: fake devices share the cores.")
  if FLAGS.retain_freed_memory:
    from cpm_jax import host_memory  # only here: a --checkouts child may import a cpm_jax without it
    if not host_memory.retain_freed_memory():
      raise SystemExit("--retain_freed_memory: the C library has no mallopt (glibc only).")
  import jax
  jax.config.update("jax_platforms", FLAGS.platform)
  if FLAGS.platform == "cpu":
    import torch
    torch.set_num_threads(os.cpu_count())

  config = model_config()
  batch = make_batch(FLAGS.batch_size, FLAGS.seq_len, config.vocab_size)
  if FLAGS.side:  # a child process of the alone timing
    if FLAGS.side not in BUILDERS:
      raise SystemExit(f"--side={FLAGS.side}: expected one of {SIDES}.")
    side = build([FLAGS.side], config, batch)[FLAGS.side]
    times = timed_steps(side, FLAGS.steps_per_round)
    print(RESULT_PREFIX + json.dumps({"times": times, "loss": side.step(), "load": os.getloadavg()[0],
                                      "remat_policy": config.remat_policy}), flush=True)
    return
  if FLAGS.checkouts:
    compare_checkouts(FLAGS.checkouts)
    return

  from cpm_jax import flops
  from cpm_jax.models import cpm

  names = FLAGS.sides or (list(SIDES) if FLAGS.platform == "cpu" else ["cpm_jax", "flax"])
  if unknown := set(names) - set(SIDES):
    raise SystemExit(f"--sides: unknown {sorted(unknown)}; expected some of {SIDES}.")
  if FLAGS.platform != "cpu" and "pytorch" in names:
    raise SystemExit("--sides=pytorch runs on CPU only (the test extra installs torch for CPU).")
  tokens = FLAGS.batch_size * FLAGS.seq_len
  flops_per_step = cpm.CPMLanguageModel(config).flops_per_token(FLAGS.seq_len) * tokens
  device = jax.devices()[0]
  print(f"model {FLAGS.model}: {config.num_layers} layers x {config.embed_dim}, {config.num_heads} heads, vocab "
        f"{config.vocab_size}; batch {FLAGS.batch_size} x {FLAGS.seq_len}; compute {config.dtype}, params float32; "
        f"dropout {config.dropout_rate}; cpm_jax remat {config.remat_policy}, attention {config.attention_impl}, "
        f"layers {'scanned' if config.scan_layers else 'unrolled'}; "
        f"{device.device_kind} ({FLAGS.platform}); {os.cpu_count()} CPU threads; freed memory "
        f"{'retained' if FLAGS.retain_freed_memory else 'returned (glibc default)'}; {load()}")
  print(f"FLOPs per step {flops_per_step / 1e9:.1f} G (6 x matmul params x tokens + 12 x L x E x T x tokens)")

  alone = {name: [] for name in names}
  for round_index in range(FLAGS.alone_rounds):
    for name in names[round_index % len(names):] + names[:round_index % len(names)]:
      result = run_alone(name)
      alone[name] += result["times"]
      print(f"  alone round {round_index + 1}: {name:8} {statistics.median(t[0] for t in result['times']):7.3f} "
            f"s/step, loss {result['loss']:.4f}, load {result['load']:.1f}", flush=True)

  interleaved = {name: [] for name in names}
  sides = build(names, config, batch) if FLAGS.rounds else {}
  for round_index in range(FLAGS.rounds):
    for name in names[round_index % len(names):] + names[:round_index % len(names)]:
      interleaved[name] += timed_steps(sides[name], FLAGS.steps_per_round)
    print(f"  interleaved round {round_index + 1}: " + ", ".join(
        f"{name} {statistics.median(t[0] for t in interleaved[name][-FLAGS.steps_per_round:]):.3f}"
        for name in names) + f" s/step; {load()}", flush=True)
  for name, side in sides.items():
    if side.compiled is not None:
      print(f"{name} compiled step: {compiled_stats(side.compiled)}")

  if FLAGS.platform == "cpu":
    peak, peak_name = flops.measure_matmul_flops(dtype=jax.numpy.dtype(config.dtype)), f"jnp.dot {config.dtype}"
  else:
    peak, peak_name = flops.peak_flops_per_device(device)
  print(f"peak: {peak / 1e12:.3f} TFLOP/s ({peak_name}); {load()}")
  print(f"{'':8} {'':12} {'s/step':>8} {'best':>7} {'tokens/s':>9} {'MFU':>6} {'CPU s/step':>10} {'faults/step':>11}")
  results = {}
  for name in names:
    for mode, times in (("alone", alone[name]), ("interleaved", interleaved[name])):
      if times:
        s = results[name, mode] = summary(times)
        print(f"{name:8} {mode:12} {s['wall']:8.3f} {s['best']:7.3f} {tokens / s['wall']:9.0f} "
              f"{flops_per_step / s['wall'] / peak:6.1%} {s['cpu']:10.2f} {s['faults']:11.0f}")
  for mode in ("alone", "interleaved"):
    for name in names:
      if (name, mode) in results:
        ratios = [f"{results[other, mode]['wall'] / results[name, mode]['wall']:.2f}x {other}"
                  for other in names if other != name and (other, mode) in results]
        if name == "cpm_jax" and ratios:
          print(f"cpm_jax {mode}, tokens/s against: {', '.join(ratios)} (CPU s/step: " + ", ".join(
              f"{results[other, mode]['cpu'] / results[name, mode]['cpu']:.2f}x {other}"
              for other in names if other != name and (other, mode) in results) + ")")
  for name in names:
    if (name, "alone") in results and (name, "interleaved") in results:
      print(f"{name}: interleaved / alone s/step {results[name, 'interleaved']['wall'] / results[name, 'alone']['wall']:.2f}, "
            f"CPU s/step {results[name, 'interleaved']['cpu'] / results[name, 'alone']['cpu']:.2f}")

  if FLAGS.platform == "cpu" and FLAGS.ceiling and "pytorch" in names and config.dtype == "float32":
    products = step_matmuls(config, FLAGS.batch_size, FLAGS.seq_len)
    product_flops = sum(count * 2 * math.prod(lhs) * rhs[-1] for lhs, rhs, _, count in products)
    jax_matmuls, torch_matmuls = matmul_seconds(products)
    mode = "interleaved" if ("cpm_jax", "interleaved") in results else "alone"
    jax_step, torch_step = results["cpm_jax", mode]["wall"], results["pytorch", mode]["wall"]
    print(f"the step's {len(products)} matmul shapes ({product_flops / 1e9:.1f} GFLOP) as bare matmuls: jnp "
          f"{jax_matmuls:.3f} s/step ({flops_per_step / jax_matmuls / peak:.0%} of jnp peak), torch "
          f"{torch_matmuls:.3f} s/step (torch.matmul peak {torch_matmul_flops() / 1e9:.0f} GFLOP/s); jnp/torch "
          f"matmul speed {torch_matmuls / jax_matmuls:.2f}; {load()}")
    print(f"ceiling: with no work but its matmuls cpm_jax would run {tokens / jax_matmuls:.0f} tokens/s = "
          f"{torch_step / jax_matmuls:.2f}x the PyTorch step ({mode}); cpm_jax reaches {jax_matmuls / jax_step:.0%} "
          f"of that ceiling, PyTorch {torch_matmuls / torch_step:.0%} of its own")
  print("CPU s/step: the process's CPU time per step (all threads, spinning included); unlike wall time it hardly "
        "depends on other processes' load. faults/step: minor page faults (first touches of fresh memory).")


if __name__ == "__main__":
  app.run(main)
