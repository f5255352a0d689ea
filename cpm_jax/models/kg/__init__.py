"""CPM-KM: knowledge-graph embeddings (DistMult, TransE, ComplEx) with the entity table sharded over the mesh.
Everything KG-specific is in this folder:

  config.py      KGConfig: sizes, scoring function, negatives, loss, regularization
  scoring.py     the scoring functions, per triple and as query x candidates products
  negatives.py   PyTorch-BigGraph's chunked negatives and the softmax / margin losses
  model.py       param specs (logical axes), KGEmbeddingModel for the train loop
  sparse_updates.py the family's train step: only the rows a batch reads are updated (no table-sized gradient)
  ranking.py     filtered MRR / Hits@k over all entities, computed in sharded entity blocks
  query.py       the top-k tails / heads of queries, also in sharded blocks
  data.py        the Grain pipeline over triples and KGData for the train loop
  vocabulary.py  entity / relation names (the family's "tokenizer")
  evaluation.py  the evaluation adapter and tasks: link prediction, top-k queries
  release.py     the CPM-KG release's .npy pages <-> sharded params (the "cpm_kg" checkpoint format)
"""

from cpm_jax.convert.common import Format
from cpm_jax.models.family import Family
from cpm_jax.models.kg import release
from cpm_jax.models.kg.config import KGConfig
from cpm_jax.models.kg.data import KGData
from cpm_jax.models.kg.evaluation import KGModel, KGQueryTask, LinkPredictionTask, language_model
from cpm_jax.models.kg.model import KGEmbeddingModel, param_specs
from cpm_jax.models.kg.sparse_updates import sparse_step
from cpm_jax.models.kg.vocabulary import KGVocabulary

FAMILY = Family(
    name="kg",
    config_class=KGConfig,
    param_specs=param_specs,
    training_models=(KGEmbeddingModel,),
    data=(KGData,),
    tokenizer=KGVocabulary,
    language_model=language_model,
    formats={"cpm_kg": Format(load=release.load_release)},
    train_step=sparse_step,
    serves="kg",
)
init = FAMILY.init
abstract_params = FAMILY.abstract_params
logical_axes = FAMILY.logical_axes

__all__ = ["FAMILY", "KGConfig", "KGData", "KGEmbeddingModel", "KGModel", "KGQueryTask", "KGVocabulary",
           "LinkPredictionTask", "abstract_params", "init", "language_model", "logical_axes", "param_specs"]
