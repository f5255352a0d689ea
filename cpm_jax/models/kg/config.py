"""The configuration of a knowledge-graph embedding model (CPM-KM: DistMult, dimension 256, all of Wikidata)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import gin

SCORING_FUNCTIONS = ("distmult", "transe", "complex")
REGULARIZATIONS = ("none", "l2", "n3")
LOSSES = ("softmax", "margin")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KGConfig:
  """Sizes, scoring function, negatives and loss of a KG embedding model (released size in
  gin_configs/models/cpm_km.gin).

  dim is the number of stored floats per vector: ComplEx reads a row as [real half, imaginary half] (complex rank
  dim / 2). The entity table has `entity_rows` rows (num_entities rounded up to a multiple of
  `entity_row_multiple`, so it splits evenly over the mesh); rows past num_entities are never sampled or ranked.

  Negatives follow PyTorch-BigGraph: the batch is cut into chunks of `chunk_size` positives, and every positive of
  a chunk is scored against the same `uniform_negatives` entities drawn uniformly for that chunk plus (with
  `in_batch_negatives`) the chunk's other heads / tails: one matmul per chunk and side (heads and tails are both
  corrupted). loss "softmax": cross-entropy of the positive among [positive, negatives]; "margin":
  sum of max(0, margin - positive + negative). regularization "l2" / "n3" adds regularization_weight x the sum of
  squared / cubed moduli of each positive's head, relation and tail vectors (N3 as in Lacroix et al., 2018).
  """

  num_entities: int = 14
  num_relations: int = 55
  dim: int = 256
  scoring: str = "distmult"
  regularization: str = "none"
  regularization_weight: float = 0.0
  loss: str = "softmax"
  margin: float = 1.0
  chunk_size: int = 50
  uniform_negatives: int = 50
  in_batch_negatives: bool = True
  init_stddev: float = 0.1
  entity_row_multiple: int = 128
  param_dtype: str = "float32"

  # Training options: a checkpoint's params mean the same whatever they are (convert.orbax.check_config skips them).
  execution_fields: ClassVar[tuple[str, ...]] = (
      "regularization", "regularization_weight", "loss", "margin", "chunk_size", "uniform_negatives",
      "in_batch_negatives", "init_stddev", "param_dtype")

  def __post_init__(self):
    for field, value, allowed in (("scoring", self.scoring, SCORING_FUNCTIONS),
                                  ("regularization", self.regularization, REGULARIZATIONS),
                                  ("loss", self.loss, LOSSES)):
      if value not in allowed:
        raise ValueError(f"KGConfig.{field}={value!r}; expected one of {list(allowed)}.")
    for field in ("num_entities", "num_relations", "dim", "chunk_size", "entity_row_multiple"):
      if getattr(self, field) < 1:
        raise ValueError(f"KGConfig.{field}={getattr(self, field)}; expected a positive integer.")
    if self.uniform_negatives < 0:
      raise ValueError(f"KGConfig.uniform_negatives={self.uniform_negatives}; expected >= 0.")
    if not self.uniform_negatives and not (self.in_batch_negatives and self.chunk_size > 1):
      raise ValueError("KGConfig: no negatives (uniform_negatives=0 and no in-batch negatives in chunks of "
                       f"chunk_size={self.chunk_size}); set uniform_negatives > 0 or in_batch_negatives with chunks > 1.")
    if self.scoring == "complex" and self.dim % 2:
      raise ValueError(f"KGConfig.dim={self.dim}: ComplEx stores [real, imaginary] halves, so dim must be even.")

  @property
  def entity_rows(self) -> int:
    return math.ceil(self.num_entities / self.entity_row_multiple) * self.entity_row_multiple

  @property
  def negatives_per_side(self) -> int:
    """Negatives each positive is scored against on each side (heads, tails)."""
    return self.uniform_negatives + (self.chunk_size - 1 if self.in_batch_negatives else 0)
