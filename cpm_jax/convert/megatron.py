"""Model-parallel shard directories (Megatron / DeepSpeed) and the tensor splits they use; model-agnostic.

A checkpoint is `<dir>/latest_checkpointed_iteration.txt` (Megatron) or `<dir>/latest` (DeepSpeed) naming a
tag, and `<dir>/<tag>/mp_rank_XX_model_states.pt`, one torch pickle per model-parallel rank with its
weights under 'module'. How each weight is split over ranks is a `table.Split`:
  REPLICATED   every rank holds the whole tensor
  Split(0)     contiguous blocks along dim 0 (column-parallel Linear weight/bias, vocab-split embeddings)
  Split(-1)    contiguous blocks along the last dim (row-parallel Linear weight)
  Split(0, 3)  "by parts": the tensor is [P0; P1; P2] (Q, K, V) and rank r holds [P0_r; P1_r; P2_r]

Families read with `read_shards(...)` (a `table.load_params` reader: `ShardSet.read`) and write with `save_shards`.
Both sides go tensor by tensor: a tensor's pieces are read from every rank file and merged, and written pieces go
straight into rank files whose room was reserved up front, so neither side holds a rank's module in memory.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from cpm_jax.convert import table, torch_io
from cpm_jax.convert.common import ConversionError, KeyLedger, atomic_output_dir
from cpm_jax.convert.table import REPLICATED, Split  # noqa: F401  (families name splits as megatron.*)

TRACKER_FILES = ("latest_checkpointed_iteration.txt", "latest")
RANK_FILE = "mp_rank_{:02d}_model_states.pt"
_RANK_PATTERN = re.compile(r"mp_rank_(\d+)_model_states\.pt")
# Config fields that a model-parallel degree must divide: whole heads, vocab rows and FFN columns per rank.
MODEL_PARALLEL_SIZES = ("num_heads", "vocab_size", "ffn_dim")

COLUMN = Split(0)    # torch Linear [out, in]: output rows; also biases and vocab rows of embeddings
ROW = Split(-1)      # torch Linear [out, in]: input columns
QKV = Split(0, 3)    # fused [Q; K; V], each third split over ranks
KV = Split(0, 2)     # fused [K; V] (cross-attention)


def split_tensor(x: np.ndarray, split: Split, num_ranks: int, name: str = "tensor") -> list[np.ndarray]:
  """The per-rank pieces of a full tensor (the inverse of `merge_tensors`)."""
  piece_shape(x.shape, split, num_ranks, name)  # checks that it splits
  if split.axis is None:
    return [x] * num_ranks
  parts = [np.split(part, num_ranks, axis=split.axis) for part in np.split(x, split.parts, axis=split.axis)]
  return [np.concatenate([part[rank] for part in parts], axis=split.axis) if split.parts > 1 else parts[0][rank]
          for rank in range(num_ranks)]


def merge_tensors(pieces: Sequence[np.ndarray], split: Split, name: str = "tensor") -> np.ndarray:
  """The full tensor from its per-rank pieces; replicated pieces must agree (to fp16 training noise)."""
  shapes = {tuple(piece.shape) for piece in pieces}
  if len(shapes) > 1:
    raise ConversionError(f"{name}: ranks hold different shapes {[tuple(p.shape) for p in pieces]}; shards from "
                          "different model-parallel sizes or models?")
  if split.axis is None:
    for rank, piece in enumerate(pieces[1:], 1):
      if not np.allclose(piece, pieces[0], rtol=1e-3, atol=1e-3):
        raise ConversionError(f"{name}: replicated tensor differs between rank 0 and rank {rank}; shards from "
                              "different checkpoints?")
    return pieces[0]
  parts = [np.split(piece, split.parts, axis=split.axis) for piece in pieces]
  return np.concatenate([rank_parts[part] for part in range(split.parts) for rank_parts in parts],
                        axis=split.axis)


def _tag_from(directory: pathlib.Path) -> str:
  for name in TRACKER_FILES:
    tracker = directory / name
    if tracker.is_file():
      text = tracker.read_text().strip()
      if not text:
        raise ConversionError(f"{tracker} is empty; expected an iteration number or a tag.")
      return str(int(text)) if text.isdigit() else text
  raise ConversionError(f"{directory}: neither {' nor '.join(TRACKER_FILES)} nor mp_rank_XX_model_states.pt "
                        "files found; pass the directory of a Megatron/DeepSpeed checkpoint or give the tag "
                        "(--tag).")


def _rank_files(directory: pathlib.Path) -> list[pathlib.Path]:
  ranks = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _RANK_PATTERN.fullmatch(p.name)))
  if not ranks:
    raise ConversionError(f"{directory}: no mp_rank_XX_model_states.pt files.")
  missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
  if missing:
    raise ConversionError(f"{directory}: missing shard {directory / RANK_FILE.format(missing[0])} "
                          f"(found ranks {ranks}).")
  return [directory / RANK_FILE.format(rank) for rank in ranks]


class ShardSet:
  """The per-rank weight dicts of one model-parallel checkpoint, each tensor read when taken; see `read_shards`."""

  def __init__(self, directory: pathlib.Path, tag: str, files: list[torch_io.TensorFile]):
    self.directory, self.tag, self.files = directory, tag, files
    self.modules = [file.state.get("module", file.state) for file in files]
    self.where = f"{directory} (mp_rank_*_model_states.pt)"
    self.ledger = KeyLedger(self.modules[0], self.where)
    self._check()

  @property
  def num_ranks(self) -> int:
    return len(self.files)

  def keys(self) -> list[str]:
    return list(self.modules[0])

  def shapes(self, key: str) -> list[tuple[int, ...]]:
    """Per-rank shapes of `key` (without reading it)."""
    self._require(key)
    return [tuple(module[key].shape) for module in self.modules]

  def dtype(self, key: str) -> np.dtype:
    """The stored dtype of `key` (without reading it)."""
    self._require(key)
    return torch_io.numpy_dtype(self.modules[0][key])

  def take(self, key: str, split: Split) -> np.ndarray:
    """The merged tensor `key`; records it as read (see `ledger.check_all_taken`)."""
    self._require(key)
    self.ledger.take(key)
    pieces = [file.read(module[key]) for file, module in zip(self.files, self.modules)]
    return merge_tensors(pieces, split, f"{key!r} in {self.directory}/mp_rank_*")

  def read(self, key: str, split: Split) -> tuple[np.ndarray, str]:
    """`take` as a `table.load_params` reader: (merged tensor, "where: key")."""
    return self.take(key, split), f"{self.where}: {key}"

  def _require(self, key: str) -> None:
    for file, module in zip(self.files, self.modules):
      if key not in module:
        raise ConversionError(f"{file.path}: missing key {key!r}.")

  def _check(self) -> None:
    for file, module in zip(self.files, self.modules):
      world = file.state.get("mp_world_size")
      if world is not None and int(world) != self.num_ranks:
        raise ConversionError(f"{file.path}: saved with mp_world_size={world} but {self.directory} holds "
                              f"{self.num_ranks} rank files; shards from different model-parallel sizes?")
      iteration = file.state.get("iteration")
      if iteration is not None and self.tag.isdigit() and int(iteration) != int(self.tag):
        raise ConversionError(f"{file.path}: holds iteration {iteration} but sits in directory {self.tag!r}; "
                              "shards from different iterations?")
      extra = set(module) ^ set(self.modules[0])
      if extra:
        raise ConversionError(f"{file.path}: keys {sorted(extra)[:8]} differ from those of "
                              f"{self.files[0].path.name}.")


def read_shards(path: str | os.PathLike, tag: str | None = None, trust_pickle: bool = False) -> ShardSet:
  """Opens `<path>/<tag>/mp_rank_XX_model_states.pt` (tag from the tracker file unless given).

  `path` may also be the tag directory itself. Only the files' pickles are read here; tensors when `take`n.
  """
  root = pathlib.Path(path)
  if not root.is_dir():
    raise ConversionError(f"{root}: not a directory (expected a Megatron/DeepSpeed checkpoint directory).")
  if tag is None and any(_RANK_PATTERN.fullmatch(p.name) for p in root.iterdir()):
    directory, tag = root, root.name
  else:
    tag = tag or _tag_from(root)
    directory = root / tag
    if not directory.is_dir():
      raise ConversionError(f"{directory}: no such directory (tag {tag!r} of {root}).")
  return ShardSet(directory, tag, [torch_io.TensorFile(file, trust_pickle) for file in _rank_files(directory)])


def check_divisible(config: Any, num_ranks: int) -> None:
  """A ConversionError unless `num_ranks` divides every MODEL_PARALLEL_SIZES field of the model config."""
  for name in MODEL_PARALLEL_SIZES:
    size = getattr(config, name)
    if num_ranks < 1 or size % num_ranks:
      raise ConversionError(f"--mp={num_ranks} must divide {name}={size} of the model.")


def piece_shape(shape: tuple[int, ...], split: Split, num_ranks: int, name: str) -> tuple[int, ...]:
  """The shape of one rank's piece of a tensor of `shape`."""
  if split.axis is None:
    return tuple(shape)
  if shape[split.axis] % (split.parts * num_ranks):
    raise ConversionError(f"{name}: dimension {split.axis} of size {shape[split.axis]} does not split into "
                          f"{split.parts} part(s) x {num_ranks} ranks.")
  piece = list(shape)
  piece[split.axis] //= num_ranks
  return tuple(piece)


def write_shards(path: str | os.PathLike, num_ranks: int, tensors: Sequence[table.Tensor],
                 arrays: Iterable[np.ndarray], tag: str = "release",
                 aliases: Mapping[str, str] | None = None) -> pathlib.Path:
  """Writes `<path>/<tag>/mp_rank_XX_model_states.pt` for every rank and the tracker file, atomically.

  tensors: what each module holds (key, stored shape and dtype, split: `entry.split`); arrays: their full
  stored-layout arrays, in the same order (e.g. `table.stored_arrays`). Every rank file is first written with its
  tensors' room reserved; each array is then split and its pieces written in place, so only one tensor is in
  memory at a time. aliases: key -> another key whose tensor it shares (a tied copy, stored once). The files
  also carry the bookkeeping keys DeepSpeed's loader reads.
  """
  iteration = int(tag) if tag.isdigit() else 0
  with atomic_output_dir(path) as tmp:
    (tmp / tag).mkdir()
    files = []
    for rank in range(num_ranks):
      module = {t.key: torch_io.placeholder(piece_shape(t.shape, t.entry.split, num_ranks, t.key), t.dtype)
                for t in tensors}
      module.update({alias: module[key] for alias, key in (aliases or {}).items()})
      state = {"module": module, "iteration": iteration, "mp_world_size": num_ranks, "dp_world_size": 1,
               "global_steps": iteration, "skipped_steps": 0, "csr_tensor_module_names": set()}
      torch_io.save_placeholders(tmp / tag / RANK_FILE.format(rank), state)
      files.append(torch_io.TensorFile(tmp / tag / RANK_FILE.format(rank), writable=True))
    for t, array in zip(tensors, arrays, strict=True):
      for file, piece in zip(files, split_tensor(array, t.entry.split, num_ranks, t.key)):
        file.write(file.state["module"][t.key], piece)
    (tmp / TRACKER_FILES[0]).write_text(tag)
  return pathlib.Path(path)


def save_shards(params: dict, config: Any, entries: Sequence[table.Entry], path: str | os.PathLike, num_ranks: int,
                tag: str = "release", aliases: Mapping[str, str] | None = None) -> pathlib.Path:
  """`params` written by the key table `entries` as `num_ranks` model-parallel shards (`write_shards`); `config`'s
  MODEL_PARALLEL_SIZES must split evenly."""
  check_divisible(config, num_ranks)
  tensors = table.stored_tensors(params, entries)
  return write_shards(path, num_ranks, tensors, table.stored_arrays(params, tensors), tag, aliases)


def merged_shape(split: Split, shapes: Iterable[tuple[int, ...]]) -> tuple[int, ...]:
  """The full shape of a tensor from its per-rank shapes."""
  shapes = list(shapes)
  if split.axis is None:
    return shapes[0]
  full = list(shapes[0])
  full[split.axis] *= len(shapes)
  return tuple(full)
