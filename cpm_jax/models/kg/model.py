"""The KG embedding model as the training loop sees it: params (entity and relation tables), loss, FLOPs.

params = {"entities": [entity_rows, dim], "relations": [num_relations, dim]}; the entity table's rows carry the
logical axis "entities", which the partitioning rules split over every mesh axis, so no device holds the table
whole. Batches are dicts of [batch] arrays: heads, relations, tails (int32 ids) and weights (float32, 0 for
padding), as the KG Grain pipeline (cpm_jax.models.kg.data) gives them.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp

from cpm_jax import layers, partitioning, training
from cpm_jax.models.kg import negatives
from cpm_jax.models.kg.config import KGConfig
from cpm_jax.models.kg.scoring import SCORERS

# Evaluation losses draw their uniform negatives from this key, so they are comparable from step to step.
EVAL_NEGATIVES_SEED = 0


def param_specs(config: KGConfig) -> dict:
  init = layers.normal(config.init_stddev)
  return {"entities": layers.ParamSpec((config.entity_rows, config.dim), ("entities", "kg_embed"), init),
          "relations": layers.ParamSpec((config.num_relations, config.dim), ("relations", "kg_embed"), init)}


def entity_row_axes(rules=None) -> tuple[str, ...]:
  """The mesh axes the rules (default: those in force) split the entity table's rows over; the blockwise ranking and
  top-k scans need whole rows, so its vector axis must not be split."""
  spec = partitioning.logical_to_spec(("entities", "kg_embed"), rules)
  if spec[1] is not None:
    raise ValueError(f"The KG family needs whole entity rows on each device, but the rules split 'kg_embed' over "
                     f"{spec[1]}.")
  return () if spec[0] is None else ((spec[0],) if isinstance(spec[0], str) else tuple(spec[0]))


def regularization(config: KGConfig, *vectors: jax.Array) -> jax.Array:
  """Per positive [B]: regularization_weight x sum over its vectors of |x|^2 (l2) or |x|^3 (n3), |x| the modulus of
  each (complex, for ComplEx) component."""
  if config.regularization == "none":
    return jnp.zeros(vectors[0].shape[0], jnp.float32)
  power = 2 if config.regularization == "l2" else 3
  moduli = SCORERS[config.scoring].moduli
  return config.regularization_weight * sum(jnp.sum(moduli(v.astype(jnp.float32)) ** power, -1) for v in vectors)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class KGEmbeddingModel:
  """Link prediction with chunked negatives (see negatives.py); uniform negatives come from the step's rng."""

  config: KGConfig = dataclasses.field(default_factory=KGConfig)

  def param_specs(self) -> dict:
    return param_specs(self.config)

  def entity_ids(self, batch: dict, dropout_rng: jax.Array | None = None) -> jax.Array:
    """[n] the entity rows a batch reads: its heads, its tails, then each chunk's uniform negatives (tails, heads)."""
    rng = jax.random.PRNGKey(EVAL_NEGATIVES_SEED) if dropout_rng is None else dropout_rng
    uniform_ids = negatives.uniform_negatives(rng, negatives.num_chunks(batch["heads"].shape[0], self.config),
                                              self.config)
    return jnp.concatenate([batch["heads"], batch["tails"], uniform_ids.reshape(-1)])

  def loss_of_rows(self, vectors: jax.Array, relations: jax.Array, batch: dict):
    """`loss` given vectors [n, dim], the entity rows of `entity_ids` (in its order), and the relation table."""
    config = self.config
    batch_size = batch["heads"].shape[0]
    h = partitioning.constrain(vectors[:batch_size], ("batch", "kg_embed"))
    t = partitioning.constrain(vectors[batch_size:2 * batch_size], ("batch", "kg_embed"))
    uniform = partitioning.constrain(
        vectors[2 * batch_size:].reshape(2, negatives.num_chunks(batch_size, config), config.uniform_negatives,
                                         config.dim), (None, "batch", None, "kg_embed"))
    r = relations[batch["relations"]]
    weights = batch["weights"].astype(jnp.float32)
    losses, correct = negatives.chunk_losses(SCORERS[config.scoring], config, h, r, t, uniform, weights)
    weight_sum = weights.sum()
    sums = {"loss_sum": (losses * weights).sum(),
            "z_loss_sum": (regularization(config, h, r, t) * weights).sum(),
            "weight_sum": weight_sum,
            "correct_sum": (correct * weights).sum()}
    return (sums["loss_sum"] + sums["z_loss_sum"]) / jnp.maximum(weight_sum, 1.0), sums

  def loss(self, params: dict, batch: dict, dropout_rng: jax.Array | None = None):
    """(mean loss, sums): loss_sum over both sides of every positive, z_loss_sum the regularization."""
    # One gather of every entity row the batch reads (XLA's partitioner gathers from each device's own rows and
    # sums, never all-gathering the table); its gradient is one scatter into the table's shards.
    vectors = params["entities"][self.entity_ids(batch, dropout_rng)]
    return self.loss_of_rows(vectors, params["relations"], batch)

  def with_config(self, config):
    """This model with another config (e.g. other execution fields)."""
    return dataclasses.replace(self, config=config)

  def example_batch(self, batch_size: int, seq_len: int, target_len: int = 0) -> dict:
    """KGData's batches of triples (seq_len and target_len do not apply)."""
    del seq_len, target_len
    ids = ((), "int32")
    return training.abstract_batch(batch_size, {"heads": ids, "relations": ids, "tails": ids,
                                                "weights": ((), "float32")})

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per positive triple (the loop's "token"): two sides x negatives x dim multiply-adds, x3 for
    the backward pass; seq_len is 1 for triples."""
    del seq_len
    return 3.0 * 2 * 2 * self.config.negatives_per_side * self.config.dim
