"""The Grain LM pipeline: shuffle, tokenize, pack documents into rows, batch, and give each process its share.

A document is `tokenizer.encode(text) + [eod_id]`; its next-token pairs (inputs = doc[:-1], targets = doc[1:]) are
cut into pieces of at most `seq_len` (only documents longer than a row are cut), and the pieces are packed first-fit
into rows of `seq_len`. Every batch is a dict of numpy arrays [per_process_batch, seq_len]:
  inputs      int32    token ids
  targets     int32    the next token of the same document, 0 in padding
  weights     float32  1 where a target counts, 0 in padding
  segment_ids int32    1, 2, ... per document piece within a row, 0 in padding
  positions   int32    position within the piece, restarting at 0
so attention (same segment, causal) and positions never cross documents; every token of a document is a target
exactly once, except its first token (which has no context).

Training (make_lm_iterator): documents are sharded over processes (process p reads documents p, p + P, ...),
each process packs and batches its own share, and `jax.make_array_from_process_local_data` turns the per-process
batches into a global array. With num_epochs=None the iterator never ends: stop by step count (with a finite number
of epochs, processes may run out at different steps). A final partial batch is padded with empty rows.

Evaluation (make_eval_iterator): one pass over the split without shuffling; every process packs all documents
the same way and takes its rows of each global batch, so all processes see the same number of batches
(cpm_jax.data.processes, shared with the other families' pipelines).

Iterator state: the returned grain.DatasetIterator has get_state() -> dict (small, JSON-serialisable) and
set_state(dict). Restoring a state into a fresh iterator built with the same arguments continues exactly after the
last batch returned before get_state(). With Orbax (one file per process):
  import grain, orbax.checkpoint as ocp
  manager.save(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(iterator)))
  manager.restore(step, args=ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(iterator)))
where the manager was created with item_handlers={"data": grain.checkpoint.CheckpointHandler()} (or registered).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import gin
import grain
import numpy as np
from absl import flags

from cpm_jax.data import processes


class Tokenizer(Protocol):
  eod_id: int

  def encode(self, text: str) -> list[int]:
    ...


class _Flatten(grain.experimental.FlatMapTransform):
  """A list of pieces -> the pieces."""

  max_fan_out = 1 << 20  # unused by FlatMapIterDataset

  def flat_map(self, element):
    return element


def document_pieces(text: str | bytes, tokenizer: Tokenizer, seq_len: int) -> list[dict[str, np.ndarray]]:
  """The next-token pairs of one document (tokens + [eod]) cut into pieces of at most seq_len."""
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  tokens = np.asarray(tokenizer.encode(text) + [tokenizer.eod_id], np.int32)
  inputs, targets = tokens[:-1], tokens[1:]
  return [{"inputs": inputs[start:start + seq_len], "targets": targets[start:start + seq_len]}
          for start in range(0, len(inputs), seq_len)]


def _example_pieces(example: Mapping[str, Any], tokenizer: Tokenizer, seq_len: int) -> list[dict[str, np.ndarray]]:
  return document_pieces(example["text"], tokenizer, seq_len)


def _lm_batch(packed: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
  """The batch features from packed rows, padded with all-zero rows up to `rows`."""
  segment_ids = packed["inputs_segment_ids"]
  return processes.pad_rows({"inputs": packed["inputs"], "targets": packed["targets"],
                             "weights": (segment_ids > 0).astype(np.float32), "segment_ids": segment_ids,
                             "positions": packed["inputs_positions"]}, rows)


def _packed_batches(documents: grain.MapDataset, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                    seed: int, shuffle: bool, num_epochs: int | None, num_packing_bins: int | None,
                    read_threads: int, worker_count: int) -> grain.IterDataset:
  if shuffle:
    documents = documents.shuffle(seed)
  pieces = (documents.repeat(num_epochs)
            .map(functools.partial(_example_pieces, tokenizer=tokenizer, seq_len=seq_len))
            .to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads)))
  rows = grain.experimental.FirstFitPackIterDataset(
      grain.experimental.FlatMapIterDataset(pieces, _Flatten()), length_struct={"inputs": seq_len, "targets": seq_len},
      num_packing_bins=num_packing_bins or max(batch_size, 64), seed=seed, shuffle_bins=shuffle)
  batches = (rows.batch(batch_size, drop_remainder=num_epochs is None)
             .map(functools.partial(_lm_batch, rows=batch_size)))
  if worker_count:
    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags; outside an absl app use their defaults
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return batches


def _documents(data_source: Sequence[Any], max_documents: int | None) -> grain.MapDataset:
  documents = grain.MapDataset.source(data_source)
  if not len(documents):
    raise ValueError("The data source holds no documents.")
  return documents[:max_documents] if max_documents else documents


@gin.configurable
def make_lm_iterator(data_source: Sequence[Any], tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                     seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                     process_index: int | None = None, process_count: int | None = None,
                     max_documents: int | None = None, num_packing_bins: int | None = None,
                     read_threads: int = 2, worker_count: int = 0) -> grain.DatasetIterator:
  """Training batches of this process (see the module docstring).

  data_source: random access to examples with a "text" field (str or UTF-8 bytes), e.g. sources.load_split.
  max_documents: use only the first documents of the source (a quick demo). num_packing_bins: rows packed at once
  (default max(per-process batch, 64); more bins, less padding). read_threads: threads tokenizing ahead;
  worker_count > 0 tokenizes and packs in that many processes (their output differs from worker_count=0 but is
  deterministic for a given count).
  """
  index, count, batch_size = processes.process_share(process_index, process_count, global_batch_size)
  documents = processes.process_examples(_documents(data_source, max_documents), index, count, "documents")
  return iter(_packed_batches(documents, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                              shuffle=shuffle, num_epochs=num_epochs, num_packing_bins=num_packing_bins,
                              read_threads=read_threads, worker_count=worker_count))


@gin.configurable
def make_eval_iterator(data_source: Sequence[Any], tokenizer: Tokenizer, *, seq_len: int, global_batch_size: int,
                       process_index: int | None = None, process_count: int | None = None,
                       max_documents: int | None = None, num_packing_bins: int | None = None,
                       read_threads: int = 2) -> grain.DatasetIterator:
  """One pass over all documents in order, as this process's rows of each global batch (module docstring)."""
  index, count, _ = processes.process_share(process_index, process_count, global_batch_size)
  batches = _packed_batches(_documents(data_source, max_documents), tokenizer, seq_len=seq_len,
                            batch_size=global_batch_size, seed=0, shuffle=False, num_epochs=1,
                            num_packing_bins=num_packing_bins, read_threads=read_threads, worker_count=0)
  return iter(processes.process_rows(batches, global_batch_size, index, count))


def non_pad_fraction(batches: Iterable[Mapping[str, np.ndarray]]) -> float:
  """Packing efficiency: the fraction of row positions holding a token (segment_ids > 0)."""
  used = total = 0
  for batch in batches:
    used += int(np.count_nonzero(batch["segment_ids"]))
    total += batch["segment_ids"].size
  return used / total if total else 0.0
