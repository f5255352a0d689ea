"""The Grain pipeline over triples: a fresh permutation each epoch, whole batches, each process's share.

Global batch i of epoch e holds the triples at positions [i * G, (i + 1) * G) of permutation e (numpy's
Generator seeded with (seed, e)); process p of P takes rows [p * G / P, (p + 1) * G / P) of it, so the global
batches are the same for any number of processes, and consecutive rows form the model's negative-sharing chunks.
A batch is gathered from the [n, 3] id array in one vectorised step (per-triple Grain transforms would cost a
Python call per triple); Grain supplies the random-access dataset, read-ahead threads and the checkpointable
iterator, whose get_state() / set_state() resume exactly after the last batch returned. The final partial batch of
an epoch is dropped (every triple is seen once per epoch but those); evaluation batches cover every triple once,
padded with weight-0 rows.

Batches are dicts of per-process numpy arrays: heads, relations, tails (int32) and weights (float32).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Iterable, Iterator

import gin
import grain
import numpy as np

from cpm_jax.data import sources, triples as triple_files
from cpm_jax.data.processes import ProcessShare, process_share
from cpm_jax.model_fit import Requirement
from cpm_jax.models.kg.vocabulary import KGVocabulary


def _first_row_and_rows(global_batch_size: int, process_index: int | None,
                        process_count: int | None) -> tuple[int, int]:
  index, _, rows = process_share(process_index, process_count, global_batch_size)
  return index * rows, rows


def _batch(triples: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
  return {"heads": triples[:, 0].copy(), "relations": triples[:, 1].copy(), "tails": triples[:, 2].copy(),
          "weights": weights.astype(np.float32)}


class ShuffledTripleBatches:
  """Random access to this process's share of every training batch (len: all batches of all epochs)."""

  def __init__(self, triples: np.ndarray, global_batch_size: int, *, seed: int, shuffle: bool = True,
               num_epochs: int | None = None, process_index: int | None = None, process_count: int | None = None):
    self._triples = np.ascontiguousarray(triples, np.int32).reshape(-1, 3)
    self._global = global_batch_size
    self._first_row, self._rows = _first_row_and_rows(global_batch_size, process_index, process_count)
    self._batches_per_epoch = len(self._triples) // global_batch_size
    if not self._batches_per_epoch:
      raise ValueError(f"{len(self._triples)} training triples fill no batch of global_batch_size={global_batch_size}.")
    self._seed, self._shuffle = seed, shuffle
    self._length = sys.maxsize if num_epochs is None else num_epochs * self._batches_per_epoch
    self._orders: dict[int, np.ndarray] = {}  # the permutations of at most two epochs (read-ahead crosses one)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._length

  def _order(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._orders:
        if len(self._orders) > 1:
          del self._orders[min(self._orders)]
        self._orders[epoch] = (np.random.default_rng((self._seed, epoch)).permutation(len(self._triples))
                               if self._shuffle else np.arange(len(self._triples)))
      return self._orders[epoch]

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    epoch, batch = divmod(index, self._batches_per_epoch)
    start = batch * self._global + self._first_row
    rows = self._triples[self._order(epoch)[start:start + self._rows]]
    return _batch(rows, np.ones(len(rows), np.float32))


@gin.configurable
def make_triple_iterator(triples: np.ndarray, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                         num_epochs: int | None = None, process_index: int | None = None,
                         process_count: int | None = None, read_threads: int = 2) -> grain.DatasetIterator:
  """Training batches of this process (module docstring); with num_epochs=None it never ends."""
  source = ShuffledTripleBatches(triples, global_batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                 process_index=process_index, process_count=process_count)
  dataset = grain.MapDataset.source(source).to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
  return iter(dataset)


def eval_triple_batches(triples: np.ndarray, global_batch_size: int, *, process_index: int | None = None,
                        process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Every triple once, in order, as this process's rows of each global batch; the last one padded (weight 0)."""
  first_row, rows = _first_row_and_rows(global_batch_size, process_index, process_count)
  triples = np.asarray(triples, np.int32).reshape(-1, 3)
  for start in range(0, len(triples), global_batch_size):
    chunk = triples[start:start + global_batch_size]
    weights = np.zeros(global_batch_size, np.float32)
    weights[:len(chunk)] = 1.0
    chunk = np.concatenate([chunk, np.zeros((global_batch_size - len(chunk), 3), np.int32)])
    yield _batch(chunk[first_row:first_row + rows], weights[first_row:first_row + rows])


def load_triples(name: str, split: str, data_dir: str | os.PathLike) -> np.ndarray:
  """A split of a kg_triples dataset as an int32 [n, 3] array of (head, relation, tail) ids, in file order."""
  source = sources.load_split(name, split, data_dir)
  return triple_files.as_array(source.__getitems__(range(len(source))))


def dataset_directory(name: str, data_dir: str | os.PathLike) -> str:
  """The built dataset's folder: its metadata.json holds the entity and relation names (a KG vocabulary)."""
  return os.fspath(sources.dataset_builder(name, data_dir).data_dir)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KGData(ProcessShare):
  """Triples of a kg_triples TFDS dataset (default: PyKEEN's UMLS from the pykeen wheel) for the train loop."""

  dataset: str = "kg_triples/umls"
  data_dir: str = "~/tensorflow_datasets"
  train_split: str = "train"
  eval_split: str = "validation"
  global_batch_size: int = 1000
  read_threads: int = 2

  @property
  def seq_len(self) -> int:
    """One triple is the loop's "token": its tokens/s are triples/s."""
    return 1

  def split(self, name: str) -> np.ndarray:
    return load_triples(self.dataset, name, os.path.expanduser(self.data_dir))

  def checkpoint_metadata(self) -> dict:
    """Recorded with the model in the workdir: the dataset (its splits filter evaluation's ranks) and, as the
    "tokenizer", the folder holding its entity and relation names."""
    return {"dataset": self.dataset, "data_dir": self.data_dir,
            "tokenizer": dataset_directory(self.dataset, os.path.expanduser(self.data_dir))}

  def model_requirements(self) -> tuple[Requirement, ...]:
    """What the batches need of KGConfig (cpm_jax.model_fit): the dataset's entity and relation ids."""
    vocabulary = KGVocabulary(dataset_directory(self.dataset, os.path.expanduser(self.data_dir)))
    source = f"KGData.dataset = {self.dataset!r}"
    return (Requirement("num_entities", len(vocabulary.entities), source, ("heads", "tails"), adopt=True),
            Requirement("num_relations", len(vocabulary.relations), source, ("relations",), adopt=True))

  def train_iterator(self, seed: int) -> grain.DatasetIterator:
    return make_triple_iterator(self.split(self.train_split), self.global_batch_size, seed=seed,
                                read_threads=self.read_threads, process_index=self.process_index,
                                process_count=self.process_count)

  def eval_batches(self) -> Iterable[dict]:
    return eval_triple_batches(self.split(self.eval_split), self.global_batch_size)
