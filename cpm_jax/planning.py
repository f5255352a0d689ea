"""Which mesh, will it fit, how fast could it be: a planner for training runs on many accelerators.

For a training model of any family, a global batch and sequence length, and a number of devices of one kind, `plan`
lists candidate layouts (data x fsdp x tensor x stage meshes, pipeline microbatches, gradient accumulation) with
each device's bytes of params, gradients, optimizer state and activations, whether they fit, the step's FLOPs and
the bytes each device sends (ICI within a host or slice, DCN across), the recommended layout first.

Where the figures come from (nothing is allocated):
- params, optimizer state and the batch: the train state's real shardings (`training.state_shardings`) on an
  AbstractMesh of the layout's sizes: each device's shard sizes, exact;
- gradients: like the params they train, in the params' dtype;
- activations: what JAX keeps for the backward pass, read off the vjp of the real loss traced (jax.eval_shape) on
  one device's shapes (its rows of the batch; heads, MLP and vocab split over `tensor`; its stage's layers) with the
  model's remat policy and dtypes; each stack's share per layer and the rest (embeddings, head, loss) are traced
  apart, so a pipeline's microbatches, bubbles and stages scale them;
- temporaries: the backward pass of one layer recomputed under remat, and the optimizer's update;
- FLOPs: `model.flops_per_token` x tokens, plus the forward recomputed under remat and the bubbles' work;
- communication: the collectives the layout implies: gradients all-reduced over `data` (ring), FSDP's all-gathers of
  the weights (forward and backward) and reduce-scatter of their gradients, Megatron's activation all-reduces per
  row- and column-parallel kernel, the pipeline's ppermutes; an axis that spans hosts sends its ring's cross-host
  share over DCN.
The step time is compute at `efficiency` of the device's peak plus communication at the links' bandwidths (no
overlap assumed: an upper bound).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AbstractMesh, Mesh, NamedSharding

from cpm_jax import layers, partitioning, pipeline_parallel, training
from cpm_jax.models import registry

GiB = 2 ** 30
MESH_AXES = ("data", "stage", "fsdp", "tensor")  # the planner's mesh, major to minor (tensor innermost)


@dataclasses.dataclass(frozen=True)
class Device:
  """One accelerator as the planner sees it (vendor figures; links are per device and direction)."""

  name: str
  memory: float  # bytes
  peak_flops: float  # dense bf16 / fp16 FLOP/s
  ici_bandwidth: float  # bytes/s to the other devices of its host (NVLink) or slice (TPU ICI)
  dcn_bandwidth: float  # bytes/s to other hosts (InfiniBand / data-centre network), this device's share
  devices_per_host: int


DEVICES = {device.name: device for device in (
    # NVLink 2 (6 x 25 GB/s), DGX-1: 4 x 100 Gb/s InfiniBand per 8 GPUs.
    Device("V100-16GB", 16160 * 2 ** 20, 125e12, 150e9, 6.25e9, 8),
    Device("V100-32GB", 32510 * 2 ** 20, 125e12, 150e9, 6.25e9, 8),
    # A single 24 GB card (A10 / RTX 3090-4090 class), PCIe only.
    Device("GPU-24GB", 23028 * 2 ** 20, 125e12, 16e9, 3e9, 1),
    # NVLink 3 (12 x 25 GB/s), DGX A100: 8 x 200 Gb/s HDR.
    Device("A100-40GB", 40960 * 2 ** 20, 312e12, 300e9, 25e9, 8),
    Device("A100-80GB", 81920 * 2 ** 20, 312e12, 300e9, 25e9, 8),
    # NVLink 4 (18 x 25 GB/s), DGX H100 / H200: 8 x 400 Gb/s NDR.
    Device("H100-80GB", 81559 * 2 ** 20, 989e12, 450e9, 50e9, 8),
    Device("H200-141GB", 143771 * 2 ** 20, 989e12, 450e9, 50e9, 8),
    # TPU chips: HBM, bf16 peak, ICI per chip; hosts of 4 chips, DCN per chip of a 100-200 Gb/s host NIC.
    Device("TPU-v4", 32 * GiB, 275e12, 270e9, 3e9, 4),
    Device("TPU-v5e", 16 * GiB, 197e12, 200e9, 6.25e9, 4),
    Device("TPU-v5p", 95 * GiB, 459e12, 600e9, 6.25e9, 4),
)}


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh and schedule: axis sizes, pipeline microbatches and repeats, gradient-accumulation microbatches
  (`train.num_microbatches`), and how many hosts each axis spans (DCN)."""

  data: int = 1
  fsdp: int = 1
  tensor: int = 1
  stage: int = 1
  pipeline_microbatches: int = 1
  pipeline_repeats: int = 1
  accumulation: int = 1
  dcn: tuple[tuple[str, int], ...] = ()

  @property
  def sizes(self) -> dict[str, int]:
    return {"data": self.data, "stage": self.stage, "fsdp": self.fsdp, "tensor": self.tensor}

  @property
  def devices(self) -> int:
    return math.prod(self.sizes.values())

  def hosts_of(self, axis: str) -> int:
    return dict(self.dcn).get(axis, 1)

  def describe(self) -> str:
    parts = [f"{name}={size}" for name, size in self.sizes.items() if size > 1] or ["1 device"]
    if self.stage > 1:
      parts.append(f"M={self.pipeline_microbatches}" + (f" R={self.pipeline_repeats}" if self.pipeline_repeats > 1
                                                         else ""))
    if self.accumulation > 1:
      parts.append(f"accum={self.accumulation}")
    if self.dcn:
      parts.append("DCN " + ",".join(f"{axis}x{count}" for axis, count in self.dcn))
    return " ".join(parts)

  def gin_bindings(self) -> list[str]:
    """The bindings that select this layout in train.py (the mesh's stage axis via MeshConfig.extra_axes)."""
    bindings = [f"MeshConfig.data = {self.data}", f"MeshConfig.fsdp = {self.fsdp}",
                f"MeshConfig.tensor = {self.tensor}"]
    if self.stage > 1:
      bindings += [f'MeshConfig.extra_axes = {{"stage": {self.stage}}}']
    if self.dcn:
      bindings.append("MeshConfig.dcn = {" + ", ".join(f'"{axis}": {count}' for axis, count in self.dcn) + "}")
    bindings.append(f"train.num_microbatches = {self.accumulation}")
    return bindings

  def model_bindings(self, config_name: str) -> list[str]:
    if self.stage == 1:
      return []
    return [f"{config_name}.pipeline_microbatches = {self.pipeline_microbatches}",
            f"{config_name}.pipeline_repeats = {self.pipeline_repeats}"]


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Per-device figures of one layout (bytes, FLOPs, seconds)."""

  layout: Layout
  params: float
  gradients: float
  optimizer: float
  batch: float
  activations: float
  temporaries: float
  flops: float
  ici_bytes: float
  dcn_bytes: float
  step_seconds: float
  tokens_per_second: float
  bubble: float
  usable_memory: float

  @property
  def arguments(self) -> float:
    """What the compiled step takes in: the state and the batch."""
    return self.params + self.optimizer + self.batch

  @property
  def temporary_total(self) -> float:
    """What the step allocates beyond its arguments: gradients, activations and temporaries."""
    return self.gradients + self.activations + self.temporaries

  @property
  def total(self) -> float:
    return self.arguments + self.temporary_total

  @property
  def fits(self) -> bool:
    return self.total <= self.usable_memory


# ---- bytes of arrays on a layout -----------------------------------------------------------------

def _itemsize(dtype) -> int:
  """Bytes per element; a PRNG key (e.g. dropout's, among the residuals) is its two uint32 words."""
  return 8 if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else jnp.dtype(dtype).itemsize


def _abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(sizes[name] for name in MESH_AXES), MESH_AXES)


def _shard_bytes(abstract: Any, shardings: Any) -> float:
  return float(sum(math.prod(sharding.shard_shape(leaf.shape)) * _itemsize(leaf.dtype)
                   for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))))


# ---- activations, traced -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Linear:
  """Bytes as a function of the rows a device computes on: constant + per_row x rows."""

  constant: float
  per_row: float

  def __call__(self, rows: float) -> float:
    return self.constant + self.per_row * rows


@dataclasses.dataclass(frozen=True)
class ActivationProfile:
  """What one device keeps for the backward pass: outside the stacks (embeddings, head, loss), and per layer of each
  stack (stacks of equal depth share an entry), for one tensor split."""

  outside: Linear
  per_layer: dict[int, Linear]  # stack depth -> one layer's residuals (all stacks of that depth together)
  layer_working_set: dict[int, Linear]  # ... the same without remat: what recomputing one layer needs at once


def _with_layers(params: Any, axes: Any, keep: dict[int, int]) -> Any:
  """Abstract params with each stack (leaves whose first logical axis is `layers`, grouped by depth) cut to
  keep[depth] layers."""
  def cut(leaf, leaf_axes):
    if leaf_axes[:1] != ("layers",):
      return leaf
    return jax.ShapeDtypeStruct((keep[leaf.shape[0]], *leaf.shape[1:]), leaf.dtype)
  return jax.tree.map(cut, params, axes, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _residuals(model: Any, params: Any, batch: dict) -> list:
  """Leaves of what jax.vjp of the loss keeps (ShapeDtypeStructs; the params it refers to among them)."""
  def vjp(params, batch):
    return jax.vjp(lambda p: model.loss(p, batch, jax.random.key(0))[1]["loss_sum"], params)[1]
  return jax.tree.leaves(jax.eval_shape(vjp, params, batch))


def _kept_bytes(model, params, seq_len: int, target_len: int) -> Linear:
  """The bytes the vjp keeps as a Linear of the rows, from traces at 1 and 2 rows: residuals that grow with the rows,
  plus those that do not and are not params (in another dtype than the params': weights cast for compute, kept per
  layer)."""
  small = _residuals(model, params, model.example_batch(1, seq_len, target_len))
  large = _residuals(model, params, model.example_batch(2, seq_len, target_len))
  param_kinds = {(leaf.shape, jnp.dtype(leaf.dtype)) for leaf in jax.tree.leaves(params)}
  per_row = constant = 0.0
  for a, b in zip(small, large):
    size_a, size_b = (math.prod(x.shape) * _itemsize(x.dtype) for x in (a, b))
    if size_a != size_b:
      per_row += size_b - size_a
      constant += 2 * size_a - size_b
    elif (a.shape, a.dtype) not in param_kinds:
      constant += size_a
  return Linear(constant, per_row)


@functools.lru_cache(maxsize=64)
def activation_profile(model: Any, tensor: int, seq_len: int, target_len: int = 0) -> ActivationProfile:
  """The activations one device keeps, traced on its shapes with `tensor`-way model parallelism."""
  config = model.config
  specs = model.param_specs()
  axes = layers.logical_axes(specs)
  param_dtype = jnp.dtype(config.param_dtype)
  abstract = layers.abstract_params(specs, param_dtype)
  local = _abstract_mesh({"data": 1, "stage": 1, "fsdp": 1, "tensor": tensor})
  shardings = partitioning.tree_shardings(axes, local, None)
  params = jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(sharding.shard_shape(leaf.shape), leaf.dtype),
                        abstract, shardings)
  depths = sorted({leaf.shape[0] for leaf, leaf_axes in zip(jax.tree.leaves(abstract), jax.tree.leaves(
      axes, is_leaf=partitioning.is_logical_axes)) if leaf_axes[:1] == ("layers",)})

  def traced(keep: dict[int, int], traced_model) -> Linear:
    return _kept_bytes(traced_model, _with_layers(params, axes, keep), seq_len, target_len)

  def profile(traced_model) -> tuple[Linear, dict[int, Linear]]:
    outside = traced({depth: 0 for depth in depths}, traced_model)
    per_layer = {}
    for depth in depths:
      one = traced({d: int(d == depth) for d in depths}, traced_model)
      per_layer[depth] = Linear(one.constant - outside.constant, one.per_row - outside.per_row)
    return outside, per_layer

  outside, per_layer = profile(model)
  if not depths or config.remat_policy == "none":
    working = per_layer
  else:
    working = profile(model.with_config(dataclasses.replace(config, remat_policy="none")))[1]
  return ActivationProfile(outside, per_layer, working)


# ---- one layout ----------------------------------------------------------------------------------

def _axis_bytes(mesh: AbstractMesh, abstract: Any, shardings: Any, axis: str) -> float:
  """Bytes per device of the leaves split over mesh axis `axis`."""
  total = 0.0
  for leaf, sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    entries = [entry for entry in sharding.spec if entry is not None]
    names = {name for entry in entries for name in ((entry,) if isinstance(entry, str) else entry)}
    if axis in names:
      total += math.prod(sharding.shard_shape(leaf.shape)) * _itemsize(leaf.dtype)
  return total


def _collective(shard_bytes: float, size: int, hosts: int, passes: float) -> tuple[float, float]:
  """(ICI, DCN) bytes one device sends in `passes` all-gathers (or reduce-scatters) of shards of `shard_bytes` over an
  axis of `size` devices spanning `hosts` hosts, hierarchically: across hosts first, then within (an all-reduce is
  two passes)."""
  if size == 1:
    return 0.0, 0.0
  within = size // hosts
  return passes * (within - 1) * hosts * shard_bytes, passes * (hosts - 1) * shard_bytes


def _tensor_kernels(axes: Any, rules, mesh_axes) -> dict[bool, int]:
  """Counts of tensor-split kernels with an `embed` axis (each one all-reduce of [tokens, embed] per pass over
  them: Megatron's f and g), inside the stacks (True) and outside (False)."""
  counts = {True: 0, False: 0}
  for leaf_axes in jax.tree.leaves(axes, is_leaf=partitioning.is_logical_axes):
    spec = partitioning.logical_to_spec(leaf_axes, rules, mesh_axes)
    split = any(entry == "tensor" or (isinstance(entry, tuple) and "tensor" in entry) for entry in spec)
    if split and "embed" in leaf_axes and len(leaf_axes) >= 2:
      counts[leaf_axes[0] == "layers"] += 1
  return counts


# Extra fraction of block FLOPs recomputed per policy ("elementwise" recomputes element-wise ops, no product).
REMAT_RECOMPUTE = {"none": 0.0, "elementwise": 0.0, "full": 1 / 3, "dots": 0.0, "dots_no_batch": 0.05}


def estimate(model: Any, optimizer: optax.GradientTransformation, layout: Layout, device: Device, *,
             global_batch: int, seq_len: int, target_len: int = 0, efficiency: float = 0.5,
             memory_fraction: float = 0.9) -> Estimate:
  """Per-device memory, FLOPs, communication and step time of training `model` on `layout` (ValueError when the
  layout does not divide the model or the batch)."""
  mesh = _abstract_mesh(layout.sizes)
  abstract, shardings = training.state_shardings(model, optimizer, mesh)
  params = _shard_bytes(abstract.params, shardings.params)
  optimizer_bytes = _shard_bytes(abstract.opt_state, shardings.opt_state)
  rows = global_batch // layout.accumulation
  outside_split = layout.data * layout.fsdp * layout.stage
  if global_batch % layout.accumulation or rows % outside_split:
    raise ValueError(f"batch {global_batch} / accumulation {layout.accumulation} does not split over "
                     f"{outside_split} devices")
  batch = model.example_batch(global_batch, seq_len, target_len)
  batch_sharding = NamedSharding(mesh, partitioning.logical_to_spec(("batch",), None, MESH_AXES))
  batch_bytes = _shard_bytes(batch, jax.tree.map(lambda _: batch_sharding, batch))
  gradients = _shard_bytes(training.split_trainable(model, abstract.params)[0],
                           training.split_trainable(model, shardings.params)[0])  # the trainable params'

  config = model.config
  stacks_rows = rows / (layout.data * layout.fsdp)  # a stage's rows (every microbatch)
  outside_rows = rows / outside_split
  profile = activation_profile(model, layout.tensor, seq_len, target_len)
  schedule = None
  if layout.stage > 1:
    schedule = pipeline_parallel.Schedule(layout.stage, layout.pipeline_microbatches, layout.pipeline_repeats)
    if stacks_rows % layout.pipeline_microbatches:
      raise ValueError(f"{stacks_rows:g} rows per stage do not split into {layout.pipeline_microbatches} microbatches")
  activations = profile.outside(outside_rows)
  working = 0.0
  for depth, per_layer in profile.per_layer.items():
    if schedule is None:
      activations += depth * per_layer(stacks_rows)
      layer_rows = stacks_rows
    else:
      chunk = schedule.layers_per_chunk(depth, f"a stack of {depth} layers")
      layer_rows = stacks_rows / schedule.microbatches
      activations += schedule.iterations * chunk * per_layer(layer_rows)
    working = max(working, profile.layer_working_set[depth](layer_rows) - per_layer(layer_rows))
  # The optimizer's update is the size of the trained params; the backward pass holds every gradient, the
  # activations and one layer's recomputation at once.
  temporaries = max(working, gradients - activations)

  # FLOPs: the model's count, the recomputed forward, the bubbles' work.
  tokens = global_batch * seq_len
  flops = model.flops_per_token(seq_len) * tokens / layout.devices
  if profile.per_layer:
    flops *= 1 + REMAT_RECOMPUTE[config.remat_policy]
  bubble = 0.0
  if schedule is not None:
    bubble = schedule.bubble_fraction
    flops *= schedule.iterations / (schedule.microbatches * schedule.repeats)

  # Communication.
  ici = dcn = 0.0

  def add(pair):
    nonlocal ici, dcn
    ici, dcn = ici + pair[0], dcn + pair[1]

  add(_collective(gradients / layout.data, layout.data, layout.hosts_of("data"), 2))  # ring all-reduce
  fsdp_bytes = _axis_bytes(mesh, abstract.params, shardings.params, "fsdp")
  # All-gathers (forward, backward; a pipeline gathers once for both) + reduce-scatter of the gradients, in every
  # accumulation microbatch, as are the activations' collectives below.
  fsdp_passes = 2 if schedule is not None else 3
  add(_collective(fsdp_bytes, layout.fsdp, layout.hosts_of("fsdp"), fsdp_passes * layout.accumulation))
  compute_bytes = jnp.dtype(config.dtype).itemsize if profile.per_layer else 0
  if layout.tensor > 1 and profile.per_layer:
    kernels = _tensor_kernels(layers.logical_axes(model.param_specs()), partitioning.logical_axis_rules(), MESH_AXES)
    depth_total = sum(profile.per_layer) / layout.stage
    activation = config.embed_dim * seq_len * compute_bytes / layout.tensor
    factor = schedule.iterations / (schedule.microbatches * schedule.repeats) if schedule else 1.0
    all_reduces = (kernels[True] * depth_total * factor * stacks_rows + 2 * kernels[False] * outside_rows)
    add(_collective(activation * all_reduces * layout.accumulation, layout.tensor, 1, 2))
  if schedule is not None:
    activation = config.embed_dim * seq_len * compute_bytes
    sends = 2 * schedule.iterations * (stacks_rows / schedule.microbatches) * activation * len(profile.per_layer)
    sends += 2 * (layout.stage - 1) / layout.stage * stacks_rows * activation  # the stack's input gathered over stage
    if schedule.repeats > 1:
      sends += 2 * (layout.stage - 1) / layout.stage * _axis_bytes(mesh, abstract.params, shardings.params, "stage")
    sends *= layout.accumulation
    add((sends, 0.0) if layout.hosts_of("stage") == 1 else (0.0, sends))

  step = flops / (device.peak_flops * efficiency) + ici / device.ici_bandwidth + dcn / device.dcn_bandwidth
  return Estimate(layout=layout, params=params, gradients=gradients, optimizer=optimizer_bytes, batch=batch_bytes,
                  activations=activations, temporaries=temporaries, flops=flops, ici_bytes=ici, dcn_bytes=dcn,
                  step_seconds=step, tokens_per_second=tokens / step, bubble=bubble,
                  usable_memory=device.memory * memory_fraction)


# ---- candidates and the plan ---------------------------------------------------------------------

def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _stack_depths(model: Any) -> list[int]:
  specs = model.param_specs()
  return sorted({spec.shape[0] for spec in jax.tree.leaves(specs, is_leaf=layers.is_spec) if spec.axes[:1] ==
                 ("layers",)})


def _dcn(layout: Layout, hosts: int) -> tuple[tuple[str, int], ...]:
  """How many hosts each axis spans: data takes as many as it can, then stage, then fsdp (tensor stays in a host)."""
  spans, left = [], hosts
  for axis in ("data", "stage", "fsdp"):
    count = math.gcd(left, layout.sizes[axis])
    if count > 1:
      spans.append((axis, count))
      left //= count
  if left > 1:
    raise ValueError(f"{layout.describe()} cannot span {hosts} hosts without splitting `tensor` across them")
  return tuple(spans)


def candidate_layouts(model: Any, devices: int, devices_per_host: int, global_batch: int,
                      max_accumulation: int = 64, repeats: Sequence[int] = (1, 2)) -> list[Layout]:
  """Layouts of `devices` devices to consider: tensor within a host, stages that divide every stack, pipeline
  microbatches of 1-4 per stage, gradient accumulation up to `max_accumulation`."""
  depths = _stack_depths(model)
  hosts = max(devices // devices_per_host, 1)
  layouts = []
  for tensor in _divisors(min(devices, devices_per_host)):
    for stage in _divisors(devices // tensor):
      if stage > 1 and (not depths or any(depth % stage for depth in depths)):
        continue
      rest = devices // (tensor * stage)
      for fsdp in _divisors(rest):
        data = rest // fsdp
        schedules = [(1, 1)] if stage == 1 else [
            (stage * k, r) for k in (1, 2, 4) for r in repeats if all(depth % (stage * r) == 0 for depth in depths)]
        for microbatches, repeat in schedules:
          accumulation = 1
          while accumulation <= max_accumulation:
            rows = global_batch // accumulation
            if global_batch % accumulation or rows % (data * fsdp * stage) or (rows // (data * fsdp)) % microbatches:
              break
            layout = Layout(data, fsdp, tensor, stage, microbatches, repeat, accumulation)
            try:
              layouts.append(dataclasses.replace(layout, dcn=_dcn(layout, hosts)))
            except ValueError:
              pass
            accumulation *= 2
  return layouts


def plan(model: Any, optimizer: optax.GradientTransformation, device: Device, devices: int, *, global_batch: int,
         seq_len: int, target_len: int = 0, devices_per_host: int | None = None, efficiency: float = 0.5,
         memory_fraction: float = 0.9, layouts: Sequence[Layout] | None = None) -> list[Estimate]:
  """Estimates of every candidate layout, the recommended first: those that fit before those that do not, then the
  fastest step, the fewest accumulation microbatches, the least memory."""
  per_host = devices_per_host or min(device.devices_per_host, devices)
  if layouts is None:
    layouts = candidate_layouts(model, devices, per_host, global_batch)
  estimates = []
  for layout in layouts:
    try:
      estimates.append(estimate(model, optimizer, layout, device, global_batch=global_batch, seq_len=seq_len,
                                target_len=target_len, efficiency=efficiency, memory_fraction=memory_fraction))
    except ValueError:  # the model's sizes or the batch do not split this way
      continue
  # Step times equal to 3 digits rank the layout with fewer accumulation microbatches first (the model does not
  # count what each one costs: a launch, a smaller matmul).
  return sorted(estimates, key=lambda e: (not e.fits, float(f"{e.step_seconds:.3g}"), e.layout.accumulation, e.total))


def format_table(estimates: Sequence[Estimate], limit: int | None = None) -> str:
  """The plan as a table: GiB per device, TFLOP per device per step, GB sent per device per step."""
  header = ("layout", "params", "grads", "optim", "activ", "temp", "total", "fits", "TFLOP", "ICI GB", "DCN GB",
            "bubble", "step s", "tokens/s")
  rows = [header]
  for e in list(estimates)[:limit]:
    rows.append((e.layout.describe(), *(f"{value / GiB:.2f}" for value in (
        e.params, e.gradients, e.optimizer, e.activations, e.temporaries, e.total)), "yes" if e.fits else "no",
        f"{e.flops / 1e12:.1f}", f"{e.ici_bytes / 1e9:.2f}", f"{e.dcn_bytes / 1e9:.2f}", f"{100 * e.bubble:.0f}%",
        f"{e.step_seconds:.3g}", f"{e.tokens_per_second:,.0f}"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in
                     enumerate(zip(row, widths))) for row in rows]
  return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def recommendation(best: Estimate, model: Any) -> str:
  """The gin bindings that select `best`'s layout in experiments/train.py, one per line."""
  config_name = type(model.config).__name__
  return "\n".join([*best.layout.gin_bindings(), *best.layout.model_bindings(config_name)])


def plan_table(model: Any, device: str, devices: int, *, global_batch: int, seq_len: int, target_len: int = 0,
               hosts: int | None = None, optimizer: optax.GradientTransformation | None = None,
               limit: int | None = 12) -> str:
  """The planner's answer as text: the table of candidate layouts of `devices` devices of kind `device` (a name in
  DEVICES) for training `model` (any family's training model, e.g. `cpm.CPMLanguageModel(config)`), the recommended
  layout first, then the gin bindings that select it. hosts: how many hosts the devices span (default: the
  device's devices_per_host each). optimizer: default `training.make_optimizer()` (AdamW, fp32 moments)."""
  if device not in DEVICES:
    raise ValueError(f"device {device!r} is none of {sorted(DEVICES)}.")
  if hosts and devices % hosts:
    raise ValueError(f"hosts={hosts} does not divide the {devices} devices.")
  kind = DEVICES[device]
  per_host = devices // hosts if hosts else min(kind.devices_per_host, devices)
  estimates = plan(model, optimizer or training.make_optimizer(), kind, devices, global_batch=global_batch,
                   seq_len=seq_len, target_len=target_len, devices_per_host=per_host)
  if not estimates:
    raise ValueError(f"no layout of {devices} devices splits the model and the global batch {global_batch}.")
  title = (f"{type(model).__name__}: global batch {global_batch} x {seq_len} tokens on {devices} x {device} "
           f"({per_host} per host); GiB and GB per device per step")
  verdict = "fits" if estimates[0].fits else "does NOT fit (nothing does)"
  return "\n".join([title, format_table(estimates, limit), "",
                    f"Recommended ({verdict}):", recommendation(estimates[0], model)])


def xla_memory(model: Any, optimizer: optax.GradientTransformation, layout: Layout, *, global_batch: int,
               seq_len: int, target_len: int = 0) -> tuple[float, float]:
  """(argument bytes, temporary bytes) per device of the real train step compiled ahead of time for `layout` on
  this process's first devices (abstract inputs: nothing is allocated): XLA's own figures for `estimate`'s
  `arguments` and `temporary_total`. The model's config must run the layout's pipeline schedule."""
  if layout.devices > jax.device_count():
    raise ValueError(f"{layout.describe()} needs {layout.devices} devices; this process has {jax.device_count()}.")
  config = model.config
  if layout.stage > 1 and (config.pipeline_microbatches, config.pipeline_repeats) != (
      layout.pipeline_microbatches, layout.pipeline_repeats):
    raise ValueError(f"{layout.describe()}: the model's config has pipeline_microbatches="
                     f"{config.pipeline_microbatches}, pipeline_repeats={config.pipeline_repeats}; set the layout's.")
  devices = np.asarray(jax.devices()[:layout.devices]).reshape([layout.sizes[name] for name in MESH_AXES])
  mesh = Mesh(devices, MESH_AXES)
  steps = training.make_sharded_steps(model, optimizer, mesh, num_microbatches=layout.accumulation,
                                      make_step=registry.of_config(config).train_step)
  compiled = steps.train.lower(steps.abstract_state, model.example_batch(global_batch, seq_len, target_len)).compile()
  analysis = compiled.memory_analysis()
  return float(analysis.argument_size_in_bytes), float(analysis.temp_size_in_bytes)


def scaling_table(model: Any, device: str, counts: Sequence[int], *, global_batch: int, seq_len: int,
                  target_len: int = 0, optimizer: optax.GradientTransformation | None = None) -> str:
  """The recommended layout of each device count in `counts` for one global batch (strong scaling), its tokens/s
  and its speed-up over the first count (the ideal is the ratio of the counts)."""
  rows = [("devices", "recommended layout", "fits", "tokens/s", "speed-up", "ideal")]
  first = None
  for count in counts:
    best = plan(model, optimizer or training.make_optimizer(), DEVICES[device], count, global_batch=global_batch,
                seq_len=seq_len, target_len=target_len)[0]
    first = first or (count, best.tokens_per_second)
    rows.append((str(count), best.layout.describe(), "yes" if best.fits else "no", f"{best.tokens_per_second:,.0f}",
                 f"{best.tokens_per_second / first[1]:.1f}x", f"{count / first[0]:.0f}x"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(cell.ljust(width) if i == 1 else cell.rjust(width) for i, (cell, width) in
                             enumerate(zip(row, widths))) for row in rows)
