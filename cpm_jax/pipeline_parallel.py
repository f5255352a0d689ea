"""Pipeline parallelism over the `stage` mesh axis: a stack of layers split into stages fed by microbatches.

A stack's blocks are stored, trained and checkpointed as always, stacked on a leading `layers` axis; the
logical-axis rule layers -> stage splits that axis over the mesh's `stage` axis, so a checkpoint written with
stages restores without them and the reverse. On a mesh with `stage` > 1, `run_stack` runs the stack as a pipeline
(MaxText's layers/pipeline.py, from JAX primitives):

- the batch is cut into `pipeline_microbatches` microbatches; a loop of microbatches x repeats + stages - 1
  iterations runs every stage on the microbatch it holds at once (the stage function vmapped over a leading stage
  axis split over `stage`), then hands each stage's output to the next stage with a ppermute (a shard_map manual
  over `stage` only: data, fsdp and tensor stay automatic inside, so the pipeline composes with them);
- GPipe is `pipeline_repeats` = 1. With repeats R > 1 the schedule is circular: stage s holds R chunks of layers,
  chunk r being layers [(r S + s) n, (r S + s + 1) n) for n = layers / (S R), a microbatch goes round the stages R
  times, and the bubble, (S - 1) / (M R + S - 1) of the iterations, shrinks R-fold. The blocks are stored in layer
  order, so a circular step moves them into chunk order once per step (an all-to-all over `stage`; their
  gradients come back the same way);
- bubbles (a stage with no microbatch yet, or none left) compute on zeros: their inputs are replaced before the
  stage runs, so nothing they hold reaches the outputs or, through 0 x NaN, the gradients (Praxis'
  LayerwiseShardablePipelined; `poisoned_bubbles` fills them with NaN to show it in tests);
- each stage's weights are gathered over the batch axes (FSDP) once per step, before the loop, not in every
  iteration.

Outside the pipeline the batch is split over `stage` too (the rule batch -> data, fsdp, stage), so the embedding,
the output head and the loss are not repeated on every stage; inside, `stage` is the stage axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from cpm_jax import partitioning, transformer

STAGE_AXIS = "stage"

_BUBBLE_FILL: contextvars.ContextVar[float] = contextvars.ContextVar("cpm_jax_bubble_fill", default=0.0)


@contextlib.contextmanager
def poisoned_bubbles() -> Iterator[None]:
  """Within this context (while tracing) bubbles start as NaN instead of zeros: for tests that nothing a bubble
  holds leaks into the results."""
  token = _BUBBLE_FILL.set(math.nan)
  try:
    yield
  finally:
    _BUBBLE_FILL.reset(token)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A pipeline schedule: `stages` stages, `microbatches` per step, each going `repeats` times round the stages."""

  stages: int
  microbatches: int
  repeats: int = 1

  def __post_init__(self):
    for name in ("stages", "microbatches", "repeats"):
      if getattr(self, name) < 1:
        raise ValueError(f"pipeline {name}={getattr(self, name)}; expected a positive integer.")
    if self.repeats > 1 and self.microbatches < self.stages:
      raise ValueError(f"A circular pipeline (pipeline_repeats={self.repeats}) needs pipeline_microbatches >= the "
                       f"{self.stages} stages, got {self.microbatches}.")

  @property
  def iterations(self) -> int:
    """Loop iterations per step: every stage runs in each."""
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble_fraction(self) -> float:
    """The fraction of iterations a stage idles (computes a bubble)."""
    return (self.stages - 1) / self.iterations

  def layers_per_chunk(self, num_layers: int, what: str) -> int:
    """Layers each stage runs per iteration; ValueError naming `what` unless stages x repeats divides them."""
    if num_layers % (self.stages * self.repeats):
      raise ValueError(f"{what}: {num_layers} layers do not split into {self.stages} stages x {self.repeats} "
                       "repeats (pipeline_repeats); change the stage mesh axis or the repeats.")
    return num_layers // (self.stages * self.repeats)

  def describe(self) -> str:
    kind = "GPipe" if self.repeats == 1 else f"circular, {self.repeats} repeats"
    return (f"{self.stages} stages ({kind}), {self.microbatches} microbatches: {self.iterations} iterations, "
            f"bubble {100 * self.bubble_fraction:.1f}%")


def schedule(config: Any, stages: int) -> Schedule | None:
  """The schedule a transformer config (its pipeline_microbatches / pipeline_repeats) runs with on `stages`
  stages; None for one stage (no pipeline)."""
  if stages == 1:
    return None
  return Schedule(stages, config.pipeline_microbatches, config.pipeline_repeats)


def mesh_stages(mesh: jax.sharding.Mesh | None) -> int:
  """The size of `mesh`'s stage axis (1 without a mesh or without the axis)."""
  return 1 if mesh is None else dict(mesh.shape).get(STAGE_AXIS, 1)


# ---- the stack -----------------------------------------------------------------------------------

Layer = Callable[[jax.Array, Any, Any, "jax.Array | None"], jax.Array]


def run_stack(layer: Layer, x: jax.Array, side: Any, blocks: Any, blocks_axes: Any, config: Any,
              rng: jax.Array | None = None, what: str = "blocks") -> jax.Array:
  """x [batch, ...] through the stacked `blocks` (leaves [layers, ...], logical axes `blocks_axes`):
  `layer(x, side, layer_params, layer_rng) -> x` for each layer in turn.

  side: per-example inputs every layer reads (leading batch axis), e.g. the attention mask. rng: dropout; layer i
  gets fold_in(rng, i) (and, pipelined, that of its microbatch). config: remat_policy, scan_layers,
  pipeline_microbatches, pipeline_repeats. Pipelined on the active mesh's `stage` axis when it has one.
  """
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  indices = jnp.arange(num_layers)
  mesh = partitioning.active_mesh()
  plan = schedule(config, mesh_stages(mesh))
  if plan is None:
    def body(x, layer_inputs):
      params, index = layer_inputs
      return layer(x, side, params, None if rng is None else jax.random.fold_in(rng, index)), None

    return transformer.run_layers(body, x, (blocks, indices), num_layers, remat_policy=config.remat_policy,
                                  scan=config.scan_layers)[0]
  return _pipeline(layer, x, side, blocks, blocks_axes, indices, config, rng, plan, mesh, what)


def _without_axes(rules: tuple, names: set[str]) -> tuple:
  """`rules` with the mesh axes `names` taken out of every target."""
  def strip(target):
    if target is None:
      return None
    kept = tuple(axis for axis in ((target,) if isinstance(target, str) else target) if axis not in names)
    return kept or None
  return tuple((name, strip(target)) for name, target in rules)


def _rule_axes(rules: tuple, name: str) -> set[str]:
  spec = partitioning.logical_to_spec((name,), rules)[0]
  return set() if spec is None else ({spec} if isinstance(spec, str) else set(spec))


def _pipeline(layer: Layer, x, side, blocks, blocks_axes, indices, config, rng, plan: Schedule, mesh, what: str):
  stages, micro, repeats = plan.stages, plan.microbatches, plan.repeats
  per_chunk = plan.layers_per_chunk(indices.shape[0], what)
  batch = x.shape[0]
  if batch % micro:
    raise ValueError(f"{what}: batch {batch} does not split into pipeline_microbatches={micro}.")
  rules = partitioning.active_rules()
  inner_rules = _without_axes(rules, {STAGE_AXIS})  # inside, `stage` is the stage axis
  batch_axes = _rule_axes(inner_rules, "batch")
  unconstrained = PartitionSpec.UNCONSTRAINED

  def constrain(a, *spec):
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, PartitionSpec(*spec)))

  batch_entry = partitioning.logical_to_spec(("batch",), inner_rules, mesh.axis_names)[0]

  def microbatched(a):
    """[batch, ...] -> [micro, batch / micro, ...]: microbatch m holds rows m, m + micro, ..., so each device keeps
    its rows (a contiguous split would move rows between devices)."""
    a = a.reshape(batch // micro, micro, *a.shape[1:])
    return constrain(jnp.swapaxes(a, 0, 1), None, batch_entry, *(unconstrained,) * (a.ndim - 2))

  def unmicrobatched(a):
    return jnp.swapaxes(a, 0, 1).reshape(batch, *a.shape[2:])

  def chunked(leaf, axes):
    """[layers, ...] -> [repeats, stages, per_chunk, ...], split over `stage`, gathered over the batch axes."""
    rest = partitioning.logical_to_spec(axes[1:], _without_axes(rules, batch_axes | {STAGE_AXIS}), mesh.axis_names)
    leaf = leaf.reshape(repeats, stages, per_chunk, *leaf.shape[1:])
    return constrain(leaf, None, STAGE_AXIS, None, *rest)

  chunks = jax.tree.map(chunked, blocks, blocks_axes, is_leaf=partitioning.is_logical_axes)
  chunk_indices = constrain(indices.reshape(repeats, stages, per_chunk), None, STAGE_AXIS, None)
  inputs = microbatched(x)
  side = jax.tree.map(microbatched, side)
  stage_ids = jnp.arange(stages)
  fill = _BUBBLE_FILL.get()

  def stage_spec(a):
    return (STAGE_AXIS, batch_entry, *(unconstrained,) * (a.ndim - 2))

  def shift(outputs):
    """Each stage's output to the next stage (the last one's to the first): one ppermute over `stage`."""
    ring = [(i, (i + 1) % stages) for i in range(stages)]
    return jax.shard_map(lambda a: jax.lax.ppermute(a, STAGE_AXIS, ring), mesh=mesh, in_specs=PartitionSpec(STAGE_AXIS),
                         out_specs=PartitionSpec(STAGE_AXIS), axis_names={STAGE_AXIS})(outputs)

  def stage_fn(params, layer_ids, h, stage_side, microbatch):
    stage_rng = None if rng is None else jax.random.fold_in(rng, microbatch)

    def body(h, layer_inputs):
      p, index = layer_inputs
      return layer(h, stage_side, p, None if stage_rng is None else jax.random.fold_in(stage_rng, index)), None

    with partitioning.activate(mesh, inner_rules):
      return transformer.run_layers(body, h, (params, layer_ids), per_chunk, remat_policy=config.remat_policy,
                                    scan=config.scan_layers)[0]

  def iteration(carry, step):
    buffer, held = carry  # buffer [micro, mb, ...]: inputs, then each repeat's outputs; held [stages, mb, ...]
    progress = step - stage_ids  # which of the micro x repeats passes each stage works on
    valid = (progress >= 0) & (progress < micro * repeats)
    clipped = jnp.clip(progress, 0, micro * repeats - 1)
    microbatch, repeat = clipped % micro, clipped // micro
    first = jnp.where(step < micro * repeats, buffer[step % micro], fill)
    h = jnp.where((stage_ids == 0).reshape(-1, *(1,) * first.ndim), first[None], held)
    h = jnp.where(valid.reshape(-1, *(1,) * first.ndim), h, jnp.zeros_like(h))  # bubbles compute on zeros
    h = constrain(h, *stage_spec(h))

    def per_stage(leaf):
      """[repeats, stages, ...] -> each stage's chunk of its current repeat, [stages, ...]. One repeat: the same
      chunk every iteration (loop-invariant, so the backward pass keeps it once, not per iteration)."""
      if repeats == 1:
        return leaf[0]
      return jax.vmap(lambda a, r: a[r], in_axes=(1, 0), spmd_axis_name=STAGE_AXIS)(leaf, repeat)

    params = jax.tree.map(per_stage, chunks)
    layer_ids = per_stage(chunk_indices)
    stage_side = jax.tree.map(lambda a: constrain(a[microbatch], *stage_spec(a[microbatch])), side)
    out = jax.vmap(stage_fn, spmd_axis_name=STAGE_AXIS)(params, layer_ids, h, stage_side, microbatch)
    out = constrain(out, *stage_spec(out))
    done = step - (stages - 1)  # the pass the last stage finished: back to the buffer
    slot = jnp.maximum(done, 0) % micro
    buffer = buffer.at[slot].set(jnp.where(done >= 0, out[stages - 1], buffer[slot]))
    return (buffer, shift(out)), None

  held = constrain(jnp.full((stages, *inputs.shape[1:]), fill, inputs.dtype), *stage_spec(inputs))
  (outputs, _), _ = jax.lax.scan(iteration, (inputs, held), jnp.arange(plan.iterations))
  return unmicrobatched(outputs)
