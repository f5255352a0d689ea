"""The KG family's evaluation adapter (`KGModel`, what `language_model` returns) and its tasks for
experiments/evaluate.py: filtered link prediction (gin_configs/tasks/link_prediction.gin) and top-k queries
(tasks/kg_query.gin: given a head and a relation, the best tails with their scores and names).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar, Sequence

import gin
import jax
import numpy as np
from jax.sharding import Mesh

from cpm_jax import partitioning
from cpm_jax.data import sources
from cpm_jax.evaluation.tasks import Result, Task, where
from cpm_jax.models.kg import data as kg_data
from cpm_jax.models.kg import query, ranking
from cpm_jax.models.kg.config import KGConfig
from cpm_jax.models.kg.vocabulary import KGVocabulary


@dataclasses.dataclass
class KGModel:
  """A KG checkpoint's params on a mesh, its vocabulary, and the triples known true (for filtered ranks)."""

  params: dict
  config: KGConfig
  vocabulary: KGVocabulary
  mesh: Mesh
  known: list[np.ndarray]  # the splits of the dataset the model was trained on (none for a converted release)
  batch_size: int = 256

  def entity_id(self, example: dict, field: str, index: int, by_name: bool) -> int:
    value = self._field(example, field, index)
    if by_name:
      return self.vocabulary.entity_id(str(value), where(example, index))
    return self._checked_id(value, self.config.num_entities, example, field, index)

  def relation_id(self, example: dict, field: str, index: int, by_name: bool) -> int:
    value = self._field(example, field, index)
    if by_name:
      return self.vocabulary.relation_id(str(value), where(example, index))
    return self._checked_id(value, self.config.num_relations, example, field, index)

  @staticmethod
  def _field(example: dict, field: str, index: int):
    if field not in example:
      raise ValueError(f"{where(example, index)}: no field {field!r} (it has {sorted(example)}).")
    return example[field]

  @staticmethod
  def _checked_id(value, count: int, example: dict, field: str, index: int) -> int:
    if not 0 <= int(value) < count:
      raise ValueError(f"{where(example, index)}: {field} id {int(value)} is outside [0, {count}).")
    return int(value)

  def link_prediction(self, triples: np.ndarray) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Filtered realistic metrics over both sides and each triple's head and tail ranks."""
    known = ranking.KnownTriples.from_triples([*self.known, triples], self.config.num_relations)
    ranks = ranking.ranks_of_both_sides(self.params, self.config, triples, known, self.mesh,
                                        query_batch=self.batch_size)
    return ranking.both_sides_metrics(ranks), ranks

  def generate_text(self, prompts: Sequence[str]) -> list[str]:
    raise ValueError("A KG embedding model does not generate text; its answers to (head, relation) queries come "
                     "from experiments/evaluate.py --task=kg_query.")

  def top_k(self, entity_ids: Sequence[int], relation_ids: Sequence[int], k: int,
            side: str) -> tuple[np.ndarray, np.ndarray]:
    return query.top_k(self.params, self.config, entity_ids, relation_ids, k, self.mesh, side=side)


def language_model(params: dict, config: KGConfig, tokenizer: KGVocabulary, metadata: dict, *, batch_size: int = 256,
                   decoding_config=None, mesh: Mesh | None = None, strict: bool = False,
                   progress: bool = False, weights: str | None = None, long_text: bool = False) -> KGModel:
  """The family adapter evaluate.py gets (decoding_config, strict and progress do not apply to KG models; it serves
  its stored weights and generates no text, so `weights` and `long_text` must be left unset)."""
  del decoding_config, strict, progress
  if weights is not None or long_text:
    raise ValueError(f"--weights={weights} / --long_text={long_text}: a KG model serves its stored weights and "
                     "generates no text.")
  mesh = mesh or partitioning.make_mesh(partitioning.MeshConfig(data=1), devices=jax.local_devices()[:1])
  known = []
  if metadata.get("dataset"):
    data_dir = os.path.expanduser(metadata.get("data_dir", "~/tensorflow_datasets"))
    splits = sources.dataset_builder(metadata["dataset"], data_dir).info.splits
    known = [kg_data.load_triples(metadata["dataset"], split, data_dir) for split in sorted(splits)]
  return KGModel(params, config, tokenizer, mesh, known, batch_size)


@gin.configurable
@dataclasses.dataclass(kw_only=True)
class LinkPredictionTask(Task):
  """Filtered MRR and Hits@1/3/10 of head and tail prediction of every example triple, ranked against all entities
  with the known true triples (the model's training dataset and the examples) left out.

  by_name: the head / relation / tail fields hold names (e.g. a jsonl file) instead of ids (a kg_triples split).
  """

  serves: ClassVar[str] = "kg"
  name: str = "link_prediction"
  by_name: bool = False

  def evaluate(self, model: KGModel, examples, demonstrations=()):
    triples = np.asarray([(model.entity_id(e, "head", i, self.by_name),
                           model.relation_id(e, "relation", i, self.by_name),
                           model.entity_id(e, "tail", i, self.by_name)) for i, e in enumerate(examples)],
                         np.int32).reshape(-1, 3)
    metrics, ranks = model.link_prediction(triples)
    entities, relations = model.vocabulary.entities, model.vocabulary.relations
    predictions = [{"where": where(e, i), "head": entities[h], "relation": relations[r], "tail": entities[t],
                    "head_rank": float(ranks["head"][i]), "tail_rank": float(ranks["tail"][i])}
                   for i, (e, (h, r, t)) in enumerate(zip(examples, triples))]
    return Result({**metrics, "triples": len(triples)}, predictions)


@gin.configurable
@dataclasses.dataclass(kw_only=True)
class KGQueryTask(Task):
  """For each example's entity and relation (names), the k best-scoring tails (side "tail": (head, relation, ?)) or
  heads (side "head": (?, relation, tail)) among all entities, with their scores and names."""

  serves: ClassVar[str] = "kg"
  name: str = "kg_query"
  k: int = 10
  side: str = "tail"

  def evaluate(self, model: KGModel, examples, demonstrations=()):
    if self.side not in ranking.SIDES:
      raise ValueError(f"KGQueryTask.side={self.side!r}; expected one of {list(ranking.SIDES)}.")
    given = "head" if self.side == "tail" else "tail"
    entities = [model.entity_id(e, given, i, by_name=True) for i, e in enumerate(examples)]
    relations = [model.relation_id(e, "relation", i, by_name=True) for i, e in enumerate(examples)]
    scores, ids = model.top_k(entities, relations, self.k, self.side)
    names = model.vocabulary
    predictions = [{"where": where(e, i), given: names.entities[entities[i]],
                    "relation": names.relations[relations[i]],
                    f"top_{self.side}s": [{"entity": names.entities[j], "score": float(s)}
                                          for j, s in zip(ids[i], scores[i])]}
                   for i, e in enumerate(examples)]
    return Result({"queries": len(examples)}, predictions)
