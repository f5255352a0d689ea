"""Random params for model tests: every leaf drawn (LayerNorm scales around 1), so that outputs depend on the
context and comparisons between implementations can fail."""

import jax
import jax.numpy as jnp
import numpy as np


def randomised(abstract, seed: int, scale: float = 0.05):
  """Params of the tree of ShapeDtypeStructs `abstract`: normal(0, scale) noise, + 1 for LayerNorm scales (numpy:
  quick)."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    noise = scale * rng.standard_normal(x.shape, np.float32)
    return jnp.asarray(noise + 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else noise)
  return jax.tree_util.tree_map_with_path(draw, abstract)
