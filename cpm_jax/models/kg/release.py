"""The CPM-KG release format (TsinghuaAI/CPM-KG: CPM-KM's DistMult vectors) <-> a sharded params checkpoint.

A release folder holds
  ent2id.txt, rel2id.txt   one "name<TAB>id" line per entity / relation, optionally after a first line holding the
                           count (OpenKE's layout); the counts of the release are read from these files
  0.npy, 1.npy, ...        pages of `page_rows` float vectors [page_rows, dim] (100,000 in the release; the last
                           page shorter): all entity vectors in id order, then all relation vectors
Reading fills each device's rows of the tables page by page (the pages are memory-mapped and only the rows a
device holds are copied to it), so the host holds at most one page beyond the output; writing gathers one page at
a time from the devices' shards. Folders and checkpoints are written under a temporary name and renamed when whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import re
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from cpm_jax import layers, partitioning
from cpm_jax.convert.common import ConversionError, Loaded
from cpm_jax.models.kg import model as kg_model
from cpm_jax.models.kg.config import KGConfig

ENTITY_IDS, RELATION_IDS = "ent2id.txt", "rel2id.txt"
RELEASE_PAGE_ROWS = 100_000
_PAGE = re.compile(r"^(\d+)\.npy$")


def _is_count_line(line: bytes | str) -> bool:
  return "\t" not in str(line) and line.strip().isdigit()


def count_names(path: pathlib.Path) -> int:
  """The number of name lines of an id file, checked against its count line when it has one."""
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing: a CPM-KG release names its entities and relations in "
                            f"{ENTITY_IDS} and {RELATION_IDS}.")
  buffer, lines = bytearray(1 << 18), 0
  with open(path, "rb") as f:
    first = f.readline()
    f.seek(0)
    while size := f.readinto(buffer):
      lines += buffer.count(b"\n", 0, size)
    if f.tell():
      f.seek(-1, os.SEEK_END)
      lines += f.read(1) != b"\n"  # a last line without its newline
  if not _is_count_line(first):
    return lines
  if int(first) != lines - 1:
    raise ValueError(f"{path}: its first line says {int(first)} names but {lines - 1} lines follow.")
  return lines - 1


def read_names(path: str | os.PathLike) -> list[str]:
  """The names of an id file in id order (the count line, if any, skipped)."""
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if lines and _is_count_line(lines[0]):
    lines = lines[1:]
  names: list[str | None] = [None] * len(lines)
  for number, line in enumerate(lines, 1):
    name, _, index = line.rpartition("\t")
    if not index.isdigit() or int(index) >= len(lines) or names[int(index)] is not None:
      raise ValueError(f"{path}:{number}: expected 'name<TAB>id' with a unique id below {len(lines)}, got {line!r}.")
    names[int(index)] = name
  return names


@dataclasses.dataclass(frozen=True)
class ReleaseLayout:
  """What a release folder holds, from its own files: counts from the id files, page size and dim from the pages."""

  directory: pathlib.Path
  num_entities: int
  num_relations: int
  dim: int
  page_rows: int
  pages: tuple[pathlib.Path, ...]

  @classmethod
  def read(cls, directory: str | os.PathLike) -> "ReleaseLayout":
    directory = pathlib.Path(directory)
    num_entities, num_relations = count_names(directory / ENTITY_IDS), count_names(directory / RELATION_IDS)
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _PAGE.match(p.name)))
    if not found:
      raise FileNotFoundError(f"{directory}: no vector pages (0.npy, 1.npy, ...).")
    if [index for index, _ in found] != list(range(len(found))):
      missing = sorted(set(range(found[-1][0] + 1)) - {index for index, _ in found})
      raise ValueError(f"{directory}: vector pages are not numbered 0..{len(found) - 1}: page {missing[0]}.npy is "
                       "missing.")
    pages = tuple(path for _, path in found)
    shapes = [np.load(path, mmap_mode="r").shape for path in pages]
    page_rows, dim = shapes[0]
    total = num_entities + num_relations
    if len(pages) != math.ceil(total / page_rows):
      raise ValueError(f"{directory}: {num_entities} entities + {num_relations} relations ({ENTITY_IDS}, "
                       f"{RELATION_IDS}) fill {math.ceil(total / page_rows)} pages of {page_rows} vectors, but the "
                       f"folder holds {len(pages)}.")
    for index, shape in enumerate(shapes):
      want = (min(page_rows, total - index * page_rows), dim)
      if tuple(shape) != want:
        raise ValueError(f"{pages[index]}: shape {tuple(shape)}, expected {want} (page {index} of {len(pages)}).")
    return cls(directory, num_entities, num_relations, dim, page_rows, pages)

  def page_parts(self, start: int, stop: int):
    """(offset from start, memory-mapped rows) pieces of vector rows [start, stop), one page at a time."""
    for index in range(start // self.page_rows, math.ceil(stop / self.page_rows) if start < stop else 0):
      page_start = index * self.page_rows
      lo, hi = max(start, page_start), min(stop, page_start + self.page_rows)
      yield lo - start, np.load(self.pages[index], mmap_mode="r")[lo - page_start:hi - page_start]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zeros(shape: tuple[int, int], dtype) -> jax.Array:
  return jnp.zeros(shape, dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(buffer: jax.Array, rows: jax.Array, offset: jax.Array) -> jax.Array:
  return jax.lax.dynamic_update_slice_in_dim(buffer, rows, offset, axis=0)


def _filled_array(shape: tuple[int, int], dtype, sharding: jax.sharding.Sharding,
                  parts: Callable[[int, int], object]) -> jax.Array:
  """A sharded [rows, dim] array whose every device's rows come from `parts(start, stop)` ((offset, numpy rows)
  pieces of rows [start, stop); rows without a piece are zero), copied piece by piece onto that device."""
  shards = []
  for device, index in sharding.addressable_devices_indices_map(shape).items():
    start, stop, _ = index[0].indices(shape[0])
    columns = index[1] if len(index) > 1 else slice(None)
    width = len(range(*columns.indices(shape[1])))
    with jax.default_device(device):  # allocated on the device, never as a host array
      buffer = _zeros((stop - start, width), np.dtype(dtype))
    for offset, rows in parts(start, stop):
      piece = jax.device_put(np.asarray(rows[:, columns], dtype), device)
      buffer = _write_rows(buffer, piece, np.int32(offset))
    shards.append(buffer)
  return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _release_config(layout: ReleaseLayout, config: KGConfig | None) -> KGConfig:
  """`config` checked against the release, or CPM-KM's (DistMult) at the release's sizes."""
  if config is None:
    return KGConfig(num_entities=layout.num_entities, num_relations=layout.num_relations, dim=layout.dim,
                    scoring="distmult")
  for field, value, where in (("num_entities", layout.num_entities, ENTITY_IDS),
                              ("num_relations", layout.num_relations, RELATION_IDS), ("dim", layout.dim, "0.npy")):
    if getattr(config, field) != value:
      raise ValueError(f"KGConfig.{field}={getattr(config, field)} but the release at {layout.directory} has {value} "
                       f"({where}).")
  return config


def read_release(directory: str | os.PathLike, mesh: Mesh, *, config: KGConfig | None = None,
                 rules=None) -> tuple[dict, KGConfig]:
  """(params sharded on `mesh` by the rules, their config) from a release folder, streamed page by page."""
  layout = ReleaseLayout.read(directory)
  config = _release_config(layout, config)
  specs = kg_model.param_specs(config)
  abstract = layers.abstract_params(specs, config.param_dtype)
  shardings = partitioning.tree_shardings(layers.logical_axes(specs), mesh, abstract, rules)

  def entity_rows(start, stop):  # rows past num_entities (padding) stay zero
    return layout.page_parts(start, min(stop, layout.num_entities))

  def relation_rows(start, stop):
    return layout.page_parts(layout.num_entities + start, layout.num_entities + stop)

  params = {name: _filled_array(abstract[name].shape, abstract[name].dtype, shardings[name], rows)
            for name, rows in (("entities", entity_rows), ("relations", relation_rows))}
  return params, config


def load_release(path: str | os.PathLike, *, config: KGConfig | None = None, dtype: str | None = None,
                 mesh: Mesh | None = None) -> Loaded:
  """The registry's "cpm_kg" format: a release folder read into params on `mesh` (default: the first device); its
  vocabulary (the id files) is recorded as the checkpoint's "tokenizer"."""
  try:
    layout = ReleaseLayout.read(path)
    config = _release_config(layout, config)
  except (FileNotFoundError, ValueError) as e:
    raise ConversionError(str(e)) from e
  if dtype:
    config = dataclasses.replace(config, param_dtype=dtype)
  mesh = mesh or partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.local_devices()[:1])
  params, config = read_release(path, mesh, config=config)
  note = (f"{path}: {layout.num_entities} entities ({ENTITY_IDS}), {layout.num_relations} relations "
          f"({RELATION_IDS}), dim {layout.dim}, {len(layout.pages)} pages of {layout.page_rows} vectors.")
  return Loaded(params, config, [note], {"tokenizer": os.fspath(pathlib.Path(path).resolve())})


def _rows_from_shards(array: jax.Array, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of a sharded [rows, dim] array, copied from the shards that hold them (one replica each)."""
  out = np.empty((stop - start, array.shape[1]), array.dtype)
  for shard in array.addressable_shards:
    first, last, _ = shard.index[0].indices(array.shape[0])
    lo, hi = max(first, start), min(last, stop)
    if shard.replica_id == 0 and lo < hi:
      columns = shard.index[1] if len(shard.index) > 1 else slice(None)
      out[lo - start:hi - start, columns] = np.asarray(shard.data[lo - first:hi - first])
  return out


def _write_names(path: pathlib.Path, names: list[str]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{len(names)}\n")
    f.writelines(f"{name}\t{i}\n" for i, name in enumerate(names))


def write_release(params: dict, config: KGConfig, directory: str | os.PathLike, *, entity_names: list[str],
                  relation_names: list[str], page_rows: int = RELEASE_PAGE_ROWS) -> pathlib.Path:
  """Writes params in the release format (pages of `page_rows` vectors, OpenKE id files with a count line).

  The arrays must be addressable from this process (single-host); a page at a time is gathered from their shards.
  """
  if len(entity_names) != config.num_entities or len(relation_names) != config.num_relations:
    raise ValueError(f"write_release: {len(entity_names)} entity / {len(relation_names)} relation names for a model "
                     f"of {config.num_entities} / {config.num_relations}.")
  directory = pathlib.Path(directory)
  if directory.exists():
    raise FileExistsError(f"write_release: {directory} already exists; remove it or choose another path.")
  incomplete = directory.with_name(directory.name + ".incomplete")
  shutil.rmtree(incomplete, ignore_errors=True)
  incomplete.mkdir(parents=True)
  total = config.num_entities + config.num_relations
  for index in range(math.ceil(total / page_rows)):
    start, stop = index * page_rows, min(total, (index + 1) * page_rows)
    pieces = []
    if start < config.num_entities:
      pieces.append(_rows_from_shards(params["entities"], start, min(stop, config.num_entities)))
    if stop > config.num_entities:
      pieces.append(_rows_from_shards(params["relations"], max(start, config.num_entities) - config.num_entities,
                                      stop - config.num_entities))
    np.save(incomplete / f"{index}.npy", np.concatenate(pieces) if len(pieces) > 1 else pieces[0])
  _write_names(incomplete / ENTITY_IDS, entity_names)
  _write_names(incomplete / RELATION_IDS, relation_names)
  incomplete.rename(directory)
  return directory
