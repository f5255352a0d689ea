r"""What holding the blocks per layer would buy the float32 train step on CPU: a what-if, not a library feature.

cpm_jax trains with every block param stacked on a leading `layers` axis (checkpoints, conversion and the
partitioning rules all use that layout). On XLA:CPU the stacked layout costs the step work a plain Flax model does
not do: the scan fills its stacked residuals and param gradients with zeros and slices and updates them per layer,
and an unrolled loop copies each layer's params out of the stacked arrays. This script times four train steps of
one model shape, interleaved in one process (medians over rounds), all with clipping + AdamW:
- cpm_jax: the library's own train step (`training.make_sharded_steps`, as train_throughput.py times it);
- stacked: `CPMLanguageModel.loss` as it is, with `training.make_optimizer` (the layers scanned, or unrolled with
  --noscan_layers);
- per_layer: the same, with the blocks held as a tuple of per-layer trees (`transformer.run_layers(per_layer=True)`);
- flax: train_throughput.py's plain Flax peer, which holds its params per layer.
stacked and per_layer are the same plain `jax.jit(value_and_grad + update, donate)`, so they differ only in the
layout. Their losses over the first two steps must agree (the same initial params; the second step's, after one
update, checks the gradients too), else the script stops.

  .venv/bin/python benchmarks/stack_layouts.py --rounds=10 --steps_per_round=2

Every side runs with `cpm_jax.host_memory.retain_freed_memory()` applied. Run without the tests' 8-fake-device
flag (`XLA_FLAGS` unset).
"""

from __future__ import annotations

import statistics

from absl import app, flags

import train_throughput  # its flags (--model, --batch_size, --seq_len, --scan_layers, ...) configure the model

FLAGS = flags.FLAGS


def stacked_loss(model):
  return lambda params, batch: model.loss(params, batch)[0]


def per_layer_loss(model):
  """model.loss (cpm.model.hidden_states, then the tied head) with params["blocks"] a tuple of per-layer trees,
  run as an unrolled loop; the rest of the tree as in the training layout."""
  from cpm_jax import layers, objectives, transformer
  from cpm_jax.models.cpm import model as cpm_model

  config = model.config

  def loss(params, batch):
    tokens = batch["inputs"]
    positions, segment_ids = transformer.default_positions(tokens, batch["positions"], batch["segment_ids"])
    mask = layers.attention_mask(segment_ids, segment_ids, positions, positions)

    def body(x, block):
      return transformer.pre_ln_block(x, block, config, mask, None)[0], None

    x, _ = transformer.run_layers(body, cpm_model.embed(params, tokens, positions, config), params["blocks"],
                                  config.num_layers, remat_policy=config.remat_policy, per_layer=True)
    hidden = layers.layer_norm(x, params["ln_f"], config.layer_norm_eps)
    return objectives.tied_lm_loss(hidden, params["embed"]["wte"], batch["targets"], batch["weights"],
                                   dtype=config.compute_dtype, z_loss=model.z_loss,
                                   chunk_length=model.loss_chunk_length)[0]
  return loss


def own_step(loss, params, batch) -> train_throughput.Side:
  """A jitted value_and_grad + clipping/AdamW step of `loss` over `params`, state donated."""
  import jax
  import optax
  from cpm_jax import training

  optimizer = training.make_optimizer(optax.constant_schedule(train_throughput.LEARNING_RATE),
                                      weight_decay=train_throughput.WEIGHT_DECAY, b1=train_throughput.BETAS[0],
                                      b2=train_throughput.BETAS[1], eps=train_throughput.EPS,
                                      clip_norm=train_throughput.CLIP)

  def step(params, opt_state, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  holder = {"state": (params, optimizer.init(params))}
  batch = jax.device_put(batch)
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*holder["state"], batch).compile()

  def run():
    *holder["state"], value = compiled(*holder["state"], batch)
    return float(value)
  return train_throughput.Side(run, compiled)


def main(argv):
  del argv
  from cpm_jax import host_memory
  host_memory.retain_freed_memory()
  import jax
  from cpm_jax import layers
  from cpm_jax.models import cpm

  config = train_throughput.model_config()
  batch = train_throughput.make_batch(FLAGS.batch_size, FLAGS.seq_len, config.vocab_size)
  model = cpm.CPMLanguageModel(config)
  params = layers.init_from_specs(model.param_specs(), jax.random.key(0))
  per_layer = {**params, "blocks": tuple(jax.tree.map(lambda a, i=i: a[i], params["blocks"])
                                         for i in range(config.num_layers))}
  copy = lambda tree: jax.tree.map(lambda a: a.copy(), tree)  # per_layer shares embed and ln_f; each side donates
  sides = {"cpm_jax": train_throughput.cpm_jax_side(config, batch),
           "stacked": own_step(stacked_loss(model), copy(params), batch),
           "per_layer": own_step(per_layer_loss(model), per_layer, batch),
           "flax": train_throughput.flax_side(config, {k: batch[k] for k in ("inputs", "targets")})}
  losses = {name: (side.step(), side.step()) for name, side in sides.items()}  # the second after one update
  if max(abs(a - b) for a, b in zip(losses["stacked"], losses["per_layer"])) > 1e-4:
    raise SystemExit(f"the layouts disagree: losses of the first two steps {losses['stacked']} stacked, "
                     f"{losses['per_layer']} per layer.")
  print(f"model {FLAGS.model}, batch {FLAGS.batch_size} x {FLAGS.seq_len}, {config.dtype}; stacked layers "
        f"{'scanned' if config.scan_layers else 'unrolled'}, remat {config.remat_policy}; losses of the first two "
        "steps: " + ", ".join(f"{name} {a:.4f} {b:.4f}" for name, (a, b) in losses.items()))
  for name, side in sides.items():
    print(f"{name:9} compiled step: {train_throughput.compiled_stats(side.compiled)}")
  rounds = {name: [] for name in sides}  # per round: (median wall s/step, median CPU s/step)
  names = list(sides)
  for round_index in range(FLAGS.rounds):
    for name in names[round_index % len(names):] + names[:round_index % len(names)]:
      steps = train_throughput.timed_steps(sides[name], FLAGS.steps_per_round)
      rounds[name].append(tuple(statistics.median(t[k] for t in steps) for k in (0, 1)))
    print(f"  round {round_index + 1}: " + ", ".join(f"{name} {rounds[name][-1][0]:.3f}" for name in names)
          + " s/step", flush=True)
  wall = {name: statistics.median(r[0] for r in values) for name, values in rounds.items()}
  cpu = {name: statistics.median(r[1] for r in values) for name, values in rounds.items()}
  for name in names:
    paired = statistics.geometric_mean(f[0] / r[0] for f, r in zip(rounds["flax"], rounds[name]))
    print(f"{name:9} {wall[name]:7.3f} s/step ({cpu[name]:.2f} CPU s), against the Flax peer: "
          f"{wall['flax'] / wall[name]:.2f}x (medians), {cpu['flax'] / cpu[name]:.2f}x (CPU s), {paired:.2f}x "
          "(geometric mean of the rounds' ratios)")


if __name__ == "__main__":
  app.run(main)
