"""Scoring functions of KG embedding models, each in two forms: one triple at a time, and a query against many
candidate entities as one matrix product.

FORMATS.md: DistMult score(h, r, t) = sum_i e_h[i] w_r[i] e_t[i]; TransE -||e_h + w_r - e_t|| (L2);
ComplEx Re(sum_i e_h[i] w_r[i] conj(e_t[i])), a row holding [real half, imaginary half].
Every score is `compare(query, candidate)`: tail prediction uses `tail_queries(h, r)` against candidate tails, head
prediction `head_queries(r, t)` against candidate heads, so corrupting either side, in training (chunked negatives)
or ranking (all entities), is a product of a [n, dim] query block with a [m, dim] candidate block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Keeps TransE's distance differentiable where a query meets its candidate exactly.
_DISTANCE_EPS = 1e-12


def _dot_all(queries: jax.Array, candidates: jax.Array) -> jax.Array:
  return jnp.einsum("...nd,...md->...nm", queries, candidates, preferred_element_type=jnp.float32)


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  half = x.shape[-1] // 2
  return x[..., :half], x[..., half:]


class _Bilinear:
  """Scores that are a dot product of a query with the candidate: one matrix product for many candidates."""

  @staticmethod
  def compare_pairs(queries, candidates):
    return jnp.sum(queries * candidates, axis=-1)

  compare = staticmethod(_dot_all)


class DistMult(_Bilinear):
  """Trilinear product with a diagonal relation."""

  @staticmethod
  def score(h, r, t):
    return jnp.sum(h * r * t, axis=-1)

  @staticmethod
  def tail_queries(h, r):
    return h * r

  @staticmethod
  def head_queries(r, t):
    return r * t

  @staticmethod
  def moduli(x):
    return jnp.abs(x)


class ComplEx(_Bilinear):
  """DistMult over complex vectors with the tail conjugated (Trouillon et al., 2016)."""

  @staticmethod
  def score(h, r, t):
    (hr, hi), (rr, ri), (tr, ti) = _halves(h), _halves(r), _halves(t)
    return jnp.sum(hr * rr * tr + hi * rr * ti + hr * ri * ti - hi * ri * tr, axis=-1)

  @staticmethod
  def tail_queries(h, r):
    """h * r as [real, imaginary]: the score is then Re(q conj(t)) = q . t."""
    (hr, hi), (rr, ri) = _halves(h), _halves(r)
    return jnp.concatenate([hr * rr - hi * ri, hr * ri + hi * rr], axis=-1)

  @staticmethod
  def head_queries(r, t):
    """p = r conj(t) as [Re p, -Im p]: the score Re(h p) is then q . h."""
    (rr, ri), (tr, ti) = _halves(r), _halves(t)
    return jnp.concatenate([rr * tr + ri * ti, rr * ti - ri * tr], axis=-1)

  @staticmethod
  def moduli(x):
    real, imaginary = _halves(x)
    return jnp.sqrt(real * real + imaginary * imaginary)


class TransE:
  """Translation: the negative L2 distance between h + r and t (Bordes et al., 2013)."""

  @staticmethod
  def score(h, r, t):
    return -jnp.sqrt(jnp.sum(jnp.square(h + r - t), axis=-1) + _DISTANCE_EPS)

  @staticmethod
  def tail_queries(h, r):
    return h + r

  @staticmethod
  def head_queries(r, t):
    """-||h + r - t|| = -||h - (t - r)||."""
    return t - r

  @staticmethod
  def compare_pairs(queries, candidates):
    return -jnp.sqrt(jnp.sum(jnp.square(queries - candidates), axis=-1) + _DISTANCE_EPS)

  @staticmethod
  def compare(queries, candidates):
    """-||q - c|| for all pairs through |q|^2 + |c|^2 - 2 q . c (one matrix product)."""
    squared = (jnp.sum(jnp.square(queries), -1)[..., :, None] + jnp.sum(jnp.square(candidates), -1)[..., None, :]
               - 2.0 * _dot_all(queries, candidates))
    return -jnp.sqrt(jnp.maximum(squared, 0.0) + _DISTANCE_EPS)

  @staticmethod
  def moduli(x):
    return jnp.abs(x)


SCORERS = {"distmult": DistMult, "complex": ComplEx, "transe": TransE}
