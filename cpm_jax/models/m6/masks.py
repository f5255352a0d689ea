"""M6's attention masks over one sequence [image patches; text tokens], set per example.

An example's mode is two numbers, so one batch mixes modes freely:
  has_image       1: the patches are in the sequence; 0: their slots are empty (segment 0, never attended)
  prefix_length   how many text tokens belong to the prefix
and every mode is a prefix LM: each position sees the whole prefix (the patches when present, then the first
`prefix_length` text tokens) bidirectionally, and the positions after it causally. M6's tasks:
  image-to-text            has_image 1, text "<bos><sep>caption<eod>", prefix_length 2
  image+text-to-text       has_image 1, text "<bos>question<sep>answer<eod>", prefix_length len(question) + 2
  text-to-text (prefix LM) has_image 0, text "<bos>first<sep>rest<eod>", prefix_length len(first) + 2
  text LM (plain causal)   has_image 0, text "<bos>document<eod>", prefix_length 0
A prefix token never sees a target token (targets come after the prefix); a target sees all of the prefix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpm_jax import layers


def segment_ids(has_image: jax.Array, text_segment_ids: jax.Array, num_patches: int) -> jax.Array:
  """int32 [batch, patches + text]: 1 for the patches of examples with an image and for text tokens, 0 for empty
  patch slots and text padding (text_segment_ids 0)."""
  patches = jnp.broadcast_to((has_image > 0).astype(jnp.int32)[:, None], (has_image.shape[0], num_patches))
  return jnp.concatenate([patches, (text_segment_ids > 0).astype(jnp.int32)], axis=1)


def prefix_lm_mask(segment_ids: jax.Array, prefix_end: jax.Array) -> jax.Array:
  """bool [batch, 1, length, length]: query i sees key j when both are in the sequence (same non-zero segment)
  and j is in the prefix (j < prefix_end of the row) or j <= i."""
  columns = jnp.arange(segment_ids.shape[1])
  visible = (columns[None, None, :] < prefix_end[:, None, None]) | (columns[None, None, :] <= columns[None, :, None])
  return layers.attention_mask(segment_ids, segment_ids, None, None) & visible[:, None]


def mask(has_image: jax.Array, text_segment_ids: jax.Array, prefix_lengths: jax.Array, num_patches: int
         ) -> tuple[jax.Array, jax.Array]:
  """(segment ids [batch, patches + text], the prefix-LM mask [batch, 1, L, L]) of a batch of examples."""
  segments = segment_ids(has_image, text_segment_ids, num_patches)
  return segments, prefix_lm_mask(segments, num_patches + prefix_lengths)
