"""Named device meshes and the logical-axis rules that place params and activations on them.

Every parameter and the main activations carry *logical* axis names (``vocab``, ``embed``, ``heads``,
``mlp``, ``batch``, ...). One table of rules maps each logical name to mesh axes (``data``, ``fsdp``,
``tensor``). Megatron's tensor parallelism (column-parallel QKV / MLP-in, row-parallel outputs,
vocab-split embeddings) and ZeRO-3 style FSDP are both just entries of that table.

The table is data: gin replaces it (`logical_axis_rules.rules`) or puts rules before it
(`logical_axis_rules.extra_rules`); a rule's name is a regex matched against the whole logical name, the first
match wins (big_vision's rules). The mesh has data, fsdp and tensor axes plus any others a MeshConfig names
(e.g. `stage`, `expert`, which rules can then map to), and each axis may span slices or hosts (DCN) as well as the
devices of one (ICI): `MeshConfig.dcn` (MaxText's create_device_mesh).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import re
from typing import Any, Iterator, Mapping, Sequence

import gin
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpm_jax.gin_setup import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")  # the axes every mesh has (MeshConfig.extra_axes adds others)

LogicalAxes = tuple  # a tuple of logical axis names (str) or None, one per array dimension
Rules = Sequence[tuple[str, Any]]

# Logical name -> mesh axis (or tuple of mesh axes, or None for replicated).
# Params: vocab/heads/mlp split over `tensor` (Megatron), embed over `fsdp` (ZeRO-3).
# Activations use their own names so that `batch` can take `fsdp` without clashing with params.
# Pipeline stages (a `stage` mesh axis, cpm_jax.pipeline_parallel) hold their layers, and outside the pipeline the
# batch is split over them too; on a mesh without `stage` those entries do nothing.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "stage")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("layers", "stage"),
    ("positions", None),
    ("qkv", None),
    ("token_types", None),
    ("classes", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
    # KG embeddings: the entity table's rows over every mesh axis (no device holds it whole), relations replicated.
    ("entities", ("data", "fsdp", "tensor")),
    ("relations", None),
    ("kg_embed", None),
)


@gin.configurable
def logical_axis_rules(rules: Rules = DEFAULT_RULES, extra_rules: Rules = ()) -> tuple[tuple[str, Any], ...]:
  """The rules table in force: `extra_rules`, then `rules` (first match wins). In gin, bind
  `logical_axis_rules.extra_rules` to change some names (e.g. `[("act_.*", None)]` replicates every activation)
  or `logical_axis_rules.rules` to replace the table. A target is a mesh axis, a list of mesh axes, or None."""
  return tuple((name, tuple(target) if isinstance(target, list) else target)
               for name, target in (*extra_rules, *rules))


@functools.lru_cache(maxsize=64)
def _rule_table(rules: tuple[tuple[str, Any], ...]) -> tuple[tuple[re.Pattern, Any], ...]:
  return tuple((re.compile(name), target) for name, target in rules)


def _rule_for(name: str, rules: tuple[tuple[str, Any], ...]) -> Any:
  """The mesh axes of logical axis `name` by the first rule whose regex matches all of it."""
  for pattern, target in _rule_table(rules):
    if pattern.fullmatch(name):
      return target
  raise KeyError(f"Logical axis {name!r} has no rule; known axes: {sorted(pattern for pattern, _ in rules)}.")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the mesh axes; -1 on one axis means "all remaining devices".

  extra_axes: further named axes and their sizes (e.g. {"stage": 2} for pipeline stages, {"expert": 4}), placed
    as `axis_order` says; params and activations use them only where logical-axis rules name them.
  axis_order: the mesh's axes, major first (default: data, the extra axes, fsdp, tensor: tensor parallelism
    innermost, on the fastest links).
  dcn: how many slices or hosts (DCN) each axis spans, e.g. {"data": 4} for data parallelism over 4 slices with
    the other axes inside each; an axis's size is its DCN count times its size within a slice (ICI). The devices
    of a slice are those with one `slice_index` (TPU multi-slice), else one process (GPU and CPU hosts); a single
    process without slices is cut into equal runs of device ids (to test layouts on CPU).
  """

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  extra_axes: Mapping[str, int] = dataclasses.field(default_factory=dict)
  axis_order: Sequence[str] | None = None
  dcn: Mapping[str, int] = dataclasses.field(default_factory=dict)

  @property
  def axis_names(self) -> tuple[str, ...]:
    reused = sorted(set(self.extra_axes) & set(MESH_AXES))
    if reused:
      raise ConfigError(f"MeshConfig.extra_axes names {reused}: set those with MeshConfig.{reused[0]} instead.")
    names = ("data", *self.extra_axes, "fsdp", "tensor") if self.axis_order is None else tuple(self.axis_order)
    expected = {"data", "fsdp", "tensor", *self.extra_axes}
    if sorted(names) != sorted(expected):
      raise ConfigError(f"MeshConfig.axis_order={list(names)} must name each of {sorted(expected)} once.")
    return names

  def resolve(self, num_devices: int) -> dict[str, int]:
    """Every axis's total size, in mesh order."""
    given = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, **self.extra_axes}
    sizes = {name: given[name] for name in self.axis_names}
    unknown = [name for name, size in sizes.items() if size == -1]
    if len(unknown) > 1:
      raise ConfigError(f"MeshConfig: at most one axis may be -1, got -1 for {unknown}.")
    for name, size in sizes.items():
      if size == 0 or size < -1:
        raise ConfigError(f"MeshConfig.{name}={size}: sizes must be positive or -1.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if num_devices % known:
      raise ConfigError(
          f"MeshConfig {sizes}: the product of the fixed axis sizes ({known}) does not divide the "
          f"number of devices ({num_devices}).")
    if unknown:
      sizes[unknown[0]] = num_devices // known
    elif known != num_devices:
      raise ConfigError(
          f"MeshConfig {sizes}: axis sizes multiply to {known} but there are {num_devices} devices; "
          "set one axis to -1 to take the rest.")
    return sizes

  def split(self, num_devices: int) -> tuple[dict[str, int], dict[str, int]]:
    """(sizes within a slice (ICI), counts across slices (DCN)) of every axis, in mesh order."""
    sizes = self.resolve(num_devices)
    unknown = sorted(set(self.dcn) - set(sizes))
    if unknown:
      raise ConfigError(f"MeshConfig.dcn names {unknown}, which are not mesh axes ({list(sizes)}).")
    dcn = {name: self.dcn.get(name, 1) for name in sizes}
    for name, count in dcn.items():
      if count < 1 or sizes[name] % count:
        raise ConfigError(f"MeshConfig.dcn[{name!r}]={count} must be positive and divide the axis size "
                          f"{sizes[name]}.")
    return {name: sizes[name] // dcn[name] for name in sizes}, dcn


def _slice_mesh(shape: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
  """The devices of one slice in `shape`, by their physical topology where mesh_utils knows it (TPU)."""
  try:
    return mesh_utils.create_device_mesh(tuple(shape), devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(shape)


def _slices(devices: Sequence[jax.Device], count: int) -> list[list[jax.Device]]:
  """`devices` grouped into `count` slices (see MeshConfig.dcn); one slice keeps the given order."""
  if count == 1:
    return [list(devices)]
  groups: dict[tuple[int, int], list[jax.Device]] = {}
  for device in sorted(devices, key=lambda d: d.id):
    groups.setdefault((getattr(device, "slice_index", 0), device.process_index), []).append(device)
  if len(groups) == 1 and count > 1:  # one process, no slices: equal runs of ids
    ordered = next(iter(groups.values()))
    size = len(ordered) // count
    return [ordered[i * size:(i + 1) * size] for i in range(count)]
  if len(groups) != count or len({len(group) for group in groups.values()}) != 1:
    raise ConfigError(f"MeshConfig.dcn asks for {count} slices, but the devices form {len(groups)} slices or "
                      f"processes of sizes {sorted(len(g) for g in groups.values())}.")
  return [groups[key] for key in sorted(groups)]


def device_array(config: MeshConfig, devices: Sequence[jax.Device]) -> np.ndarray:
  """`devices` arranged as `config`'s mesh: each axis's DCN index major, its index within a slice minor."""
  ici, dcn = config.split(len(devices))
  ici_shape, dcn_shape = tuple(ici.values()), tuple(dcn.values())
  blocks = np.stack([_slice_mesh(ici_shape, group) for group in _slices(devices, math.prod(dcn_shape))])
  blocks = blocks.reshape(dcn_shape + ici_shape)  # [dcn_0, ..., dcn_n, ici_0, ..., ici_n]
  rank = len(ici_shape)
  interleaved = blocks.transpose([axis for pair in zip(range(rank), range(rank, 2 * rank)) for axis in pair])
  return interleaved.reshape(tuple(d * i for d, i in zip(dcn_shape, ici_shape)))


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds `config`'s mesh (default axes data, fsdp, tensor) over `devices` (default: all devices, every
  process)."""
  config = config or MeshConfig()
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(device_array(config, devices), config.axis_names)


def logical_to_spec(axes: LogicalAxes, rules: Rules | None = None,
                    mesh_axes: Sequence[str] | None = None) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per array. With `mesh_axes` (a
  mesh's axis names), rules' mesh axes that the mesh lacks are left out (e.g. `stage` on a mesh without stages).

  A dimension that merges several logical axes, major first, is named by joining them with "*" (e.g.
  "batch*act_heads" for [batch * heads]); it is split over their mesh axes in that order.
  """
  rules = logical_axis_rules() if rules is None else tuple(rules)
  used: set[str] = set()
  spec = []
  for name in axes:
    if name is None:
      spec.append(None)
      continue
    targets = ()
    for part in name.split("*"):
      target = _rule_for(part, rules)
      targets += () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    targets = tuple(axis for axis in targets if axis not in used and (mesh_axes is None or axis in mesh_axes))
    used.update(targets)
    spec.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
  return PartitionSpec(*spec)


def _axes_size(mesh: Mesh, entry: Any) -> int:
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[name] for name in names)


def logical_shards(mesh: Mesh, name: str, rules: Rules | None = None) -> int:
  """How many pieces the rules cut logical axis `name` into on `mesh` (the product of the mesh axes it maps to)."""
  return _axes_size(mesh, logical_to_spec((name,), rules, mesh.axis_names)[0])


def batch_shards(mesh: Mesh, rules: Rules | None = None) -> int:
  """How many pieces the rules cut a batch into on `mesh` (the product of the mesh axes "batch" maps to)."""
  return logical_shards(mesh, "batch", rules)


def _path_name(path) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in path)


def is_logical_axes(node: Any) -> bool:
  """True for a leaf of a logical-axes tree: a tuple of str/None."""
  return isinstance(node, tuple) and all(a is None or isinstance(a, str) for a in node)


def tree_shardings(logical_tree: Any, mesh: Mesh, shapes: Any = None,
                   rules: Rules | None = None) -> Any:
  """NamedShardings for a tree of logical axes; with `shapes`, checks every split divides evenly.

  Raises a ValueError naming the parameter path, dimension, logical and mesh axis when a
  dimension is not divisible by the mesh axes it is split over.
  """
  specs = jax.tree.map(lambda axes: logical_to_spec(axes, rules, mesh.axis_names), logical_tree,
                       is_leaf=is_logical_axes)
  if shapes is not None:
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    flat_axes = jax.tree.leaves(logical_tree, is_leaf=is_logical_axes)
    flat_shapes = jax.tree.leaves(shapes)
    for (path, spec), axes, shaped in zip(flat_specs, flat_axes, flat_shapes):
      shape = tuple(getattr(shaped, "shape", shaped))
      if len(shape) != len(axes):
        raise ValueError(f"Parameter {_path_name(path)}: shape {shape} has {len(shape)} dims but "
                         f"logical axes {axes} name {len(axes)}.")
      for dim, (size, entry, logical) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape), axes)):
        parts = _axes_size(mesh, entry)
        if size % parts:
          raise ValueError(
              f"Parameter {_path_name(path)}: dimension {dim} (logical axis {logical!r}) has size "
              f"{size}, which mesh axis {entry!r} of size {parts} does not divide. Change the mesh "
              "or the model size.")
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


# ---- activation constraints ---------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "cpm_jax_partitioning", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules | None = None) -> Iterator[None]:
  """Within this context `constrain` pins activations to `mesh` by `rules`."""
  token = _ACTIVE.set((mesh, logical_axis_rules() if rules is None else tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def on_mesh(mesh: Mesh | None, rules: Rules | None = None) -> contextlib.AbstractContextManager:
  """`activate(mesh, rules)`, or no constraints at all without a mesh (single-device use)."""
  return contextlib.nullcontext() if mesh is None else activate(mesh, rules)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Sharding constraint by logical axes; a no-op outside `activate` (e.g. single-device use)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  spec = logical_to_spec(axes, rules, mesh.axis_names)
  # Skip splits the shape cannot take (e.g. batch 1 while decoding on a data=8 mesh).
  spec = PartitionSpec(*(entry if x.shape[dim] % _axes_size(mesh, entry) == 0 else None
                         for dim, entry in enumerate(spec)))
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def active_mesh() -> Mesh | None:
  active = _ACTIVE.get()
  return None if active is None else active[0]


def active_rules() -> tuple:
  """The rules `activate` put in force (the gin rules outside it)."""
  active = _ACTIVE.get()
  return logical_axis_rules() if active is None else active[1]
