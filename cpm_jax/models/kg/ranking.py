"""Filtered link-prediction ranks over all entities, counted in sharded entity blocks.

For a test triple (h, r, t) and side "tail", every entity e is a candidate tail; the filtered rank of t counts the
candidates scoring above t (optimistic rank 1 + greater) or at least as high (pessimistic 1 + greater + equal),
leaving out t itself and every other e with (h, r, e) a known true triple (train, valid or test); the realistic rank,
PyKEEN's default, is their mean. Head prediction ranks h among candidate heads of (r, t) the same way.

Each device scores the queries against its own rows of the entity table, `block_size` rows at a time, and only
the [queries] counts are summed over the mesh: no device ever holds the [queries, entities] score matrix, nor
more than a [queries, block_size] piece of it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from cpm_jax.models.kg import model as kg_model
from cpm_jax.models.kg.config import KGConfig
from cpm_jax.models.kg.scoring import SCORERS

SIDES = ("head", "tail")
HITS_AT = (1, 3, 10)


@dataclasses.dataclass(frozen=True)
class KnownTriples:
  """Every known true triple, sorted for finding the true answers of many queries at once (numpy, vectorised).

  For side "tail" a query is (h, r) and its answers are the t of known (h, r, t); for "head" a query is (r, t).
  """

  num_relations: int
  keys: dict   # side -> sorted int64 query keys, one per known triple
  answers: dict  # side -> the answer entity of each key

  @classmethod
  def from_triples(cls, triples: Sequence[np.ndarray], num_relations: int) -> "KnownTriples":
    """triples: [n, 3] (head, relation, tail) id arrays, e.g. the train, valid and test splits."""
    known = np.concatenate([np.asarray(t, np.int64).reshape(-1, 3) for t in triples])  # repeats are harmless
    keys, answers = {}, {}
    for side, (query_entity, answer) in {"tail": (0, 2), "head": (2, 0)}.items():
      key = known[:, query_entity] * num_relations + known[:, 1]
      order = np.argsort(key, kind="stable")
      keys[side], answers[side] = key[order], known[order, answer]
    return cls(num_relations, keys, answers)

  def padded_answers(self, triples: np.ndarray, side: str) -> np.ndarray:
    """[n, F] int32: the known answers of each triple's query on `side`, -1 padded; F a power of two."""
    query_entity = 0 if side == "tail" else 2
    key = triples[:, query_entity].astype(np.int64) * self.num_relations + triples[:, 1]
    lo = np.searchsorted(self.keys[side], key, "left")
    counts = np.searchsorted(self.keys[side], key, "right") - lo
    width = 1 << max(int(counts.max(initial=1)) - 1, 0).bit_length()
    offsets = np.arange(width)
    index = np.minimum(lo[:, None] + offsets, len(self.answers[side]) - 1)
    return np.where(offsets < counts[:, None], self.answers[side][index], -1).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _count_function(config: KGConfig, mesh: Mesh, axes: tuple[str, ...], side: str, block_size: int):
  scorer = SCORERS[config.scoring]

  def counts_on_device(table, queries, true_scores, excluded):
    """This device's rows: how many candidates score above / equal to the true score, per query."""
    rows = table.shape[0]
    start = (jax.lax.axis_index(axes) if axes else 0) * rows
    size = min(block_size, rows)
    positions = jnp.arange(size)

    def block(k, totals):
      greater, equal = totals
      lo = jnp.minimum(k * size, rows - size)  # the last block overlaps the one before; `fresh` drops repeats
      scores = scorer.compare(queries, jax.lax.dynamic_slice_in_dim(table, lo, size)).astype(jnp.float32)
      fresh = (lo + positions >= k * size) & (start + lo + positions < config.num_entities)
      in_block = excluded - (start + lo)
      in_block = jnp.where((in_block >= 0) & (in_block < size), in_block, size)  # size: dropped by the scatter
      hit = jnp.zeros(scores.shape, bool).at[jnp.arange(scores.shape[0])[:, None], in_block].set(True, mode="drop")
      counted = fresh[None, :] & ~hit
      greater += jnp.sum(counted & (scores > true_scores[:, None]), axis=-1, dtype=jnp.int32)
      equal += jnp.sum(counted & (scores == true_scores[:, None]), axis=-1, dtype=jnp.int32)
      return greater, equal

    zeros = jnp.zeros(queries.shape[0], jnp.int32)
    greater, equal = jax.lax.fori_loop(0, math.ceil(rows / size), block, (zeros, zeros))
    if axes:
      greater, equal = jax.lax.psum(greater, axes), jax.lax.psum(equal, axes)
    return greater, equal

  sharded_counts = jax.shard_map(
      counts_on_device, mesh=mesh, in_specs=(PartitionSpec(axes or None, None), PartitionSpec(),
                                             PartitionSpec(), PartitionSpec()),
      out_specs=(PartitionSpec(), PartitionSpec()), check_vma=False)

  def counts(params, triples, answers):
    entities, relations = params["entities"], params["relations"]
    h, r, t = entities[triples[:, 0]], relations[triples[:, 1]], entities[triples[:, 2]]
    queries, target, target_ids = ((scorer.tail_queries(h, r), t, triples[:, 2]) if side == "tail" else
                                   (scorer.head_queries(r, t), h, triples[:, 0]))
    true_scores = scorer.compare_pairs(queries, target).astype(jnp.float32)
    excluded = jnp.concatenate([target_ids[:, None], answers], axis=1)  # the target itself is never a competitor
    return sharded_counts(entities, queries, true_scores, excluded)

  return jax.jit(counts)


def filtered_ranks(params: dict, config: KGConfig, triples: np.ndarray, known: KnownTriples, side: str, mesh: Mesh,
                   *, rules=None, query_batch: int = 256, block_size: int = 4096) -> dict[str, np.ndarray]:
  """{"optimistic", "pessimistic", "realistic"} filtered ranks [n] of the true entity of each triple on `side`.

  params: the model's params on `mesh` (the entity table sharded by the rules' "entities" axes).
  """
  if side not in SIDES:
    raise ValueError(f"side={side!r}; expected one of {list(SIDES)}.")
  triples = np.asarray(triples, np.int32).reshape(-1, 3)
  counts = _count_function(config, mesh, kg_model.entity_row_axes(rules), side, block_size)
  greater, equal = [], []
  for begin in range(0, len(triples), query_batch):
    batch = triples[begin:begin + query_batch]
    padded = np.concatenate([batch, np.repeat(batch[:1], query_batch - len(batch), 0)])  # one compiled shape
    g, e = counts(params, padded, known.padded_answers(padded, side))
    greater.append(np.asarray(g)[:len(batch)])
    equal.append(np.asarray(e)[:len(batch)])
  greater, equal = np.concatenate(greater).astype(np.float64), np.concatenate(equal).astype(np.float64)
  return {"optimistic": 1 + greater, "pessimistic": 1 + greater + equal, "realistic": 1 + greater + equal / 2}


def rank_metrics(ranks: np.ndarray) -> dict[str, float]:
  """MRR and Hits@1/3/10 of (realistic) ranks."""
  ranks = np.asarray(ranks, np.float64)
  return {"mrr": float(np.mean(1.0 / ranks)), **{f"hits_at_{k}": float(np.mean(ranks <= k)) for k in HITS_AT}}


def ranks_of_both_sides(params: dict, config: KGConfig, triples: np.ndarray, known: KnownTriples, mesh: Mesh,
                        **kwargs) -> dict[str, np.ndarray]:
  """{"head", "tail"}: the realistic filtered rank of each triple's head and tail (`filtered_ranks`)."""
  return {side: filtered_ranks(params, config, triples, known, side, mesh, **kwargs)["realistic"] for side in SIDES}


def both_sides_metrics(ranks: dict[str, np.ndarray]) -> dict[str, float]:
  """MRR and Hits@k over both sides (PyKEEN's "both"), plus each side's as head_mrr, tail_hits_at_10, ..."""
  metrics = rank_metrics(np.concatenate([ranks["head"], ranks["tail"]]))
  for side in SIDES:
    metrics.update({f"{side}_{name}": value for name, value in rank_metrics(ranks[side]).items()})
  return metrics


def link_prediction(params: dict, config: KGConfig, triples: np.ndarray, known: KnownTriples, mesh: Mesh,
                    **kwargs) -> dict[str, float]:
  """Filtered realistic MRR and Hits@k of head and tail prediction of every triple (`both_sides_metrics`)."""
  return both_sides_metrics(ranks_of_both_sides(params, config, triples, known, mesh, **kwargs))
