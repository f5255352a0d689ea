"""M6's image side: cutting images into patches, and the patch-feature encoders that turn each patch into one
vector of the transformer's width.

Patches are numbered in reading order (row-major over the grid): patch k covers rows (k // grid) * p ... and
columns (k % grid) * p ... of the image, its pixels flattened (row, column, channel). Encoders, chosen by
`M6Config.patch_encoder`:
  linear    a projection of each patch's pixels (ViT's patch embedding)
  conv      a small ResNet-style stem run on each patch alone: 3x3 conv, a residual pair of 3x3 convs, average
            pool, projection (trained from scratch)
  features  a projection of precomputed patch features [batch, patches, feature_dim], e.g. the ResNet-50 grid
            features 文汇 / M6 used; a user brings their own extractor's
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cpm_jax import layers

ENCODERS = ("linear", "conv", "features")


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """[batch, height, width, channels] -> [batch, patches, patch_size * patch_size * channels], reading order."""
  b, h, w, c = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"Images of {h}x{w} do not divide into {patch_size}x{patch_size} patches.")
  grid = images.reshape(b, h // patch_size, patch_size, w // patch_size, patch_size, c)
  return jnp.transpose(grid, (0, 1, 3, 2, 4, 5)).reshape(b, (h // patch_size) * (w // patch_size), -1)


def unpatchify(patches: jax.Array, grid: int, patch_size: int, channels: int) -> jax.Array:
  """`patchify`'s inverse for a square grid of patches."""
  b = patches.shape[0]
  tiles = patches.reshape(b, grid, grid, patch_size, patch_size, channels)
  return jnp.transpose(tiles, (0, 1, 3, 2, 4, 5)).reshape(b, grid * patch_size, grid * patch_size, channels)


def grid_positions(grid: int) -> tuple[jax.Array, jax.Array]:
  """(row, column) of each patch in reading order, each int32 [grid * grid]."""
  return jnp.divmod(jnp.arange(grid * grid, dtype=jnp.int32), grid)


def _conv_specs(width_in: int, width_out: int, stddev: float) -> dict:
  return {"conv_kernel": layers.ParamSpec((3, 3, width_in, width_out), (None, None, None, None),
                                          layers.normal(stddev)),
          "conv_bias": layers.ParamSpec((width_out,), (None,), layers.zeros)}


def encoder_specs(encoder: str, *, patch_dim: int, feature_dim: int, stem_width: int, channels: int, embed: int,
                  stddev: float) -> dict:
  """Params of one patch encoder. The conv stem's kernels are small and replicated; the projection to the
  transformer's width is split on `embed` like every other [*, embed] kernel."""
  def projection(width: int) -> dict:
    return {"proj_kernel": layers.ParamSpec((width, embed), (None, "embed"), layers.normal(stddev)),
            "proj_bias": layers.ParamSpec((embed,), ("embed",), layers.zeros)}

  if encoder == "linear":
    return projection(patch_dim)
  if encoder == "features":
    return projection(feature_dim)
  # He initialisation of 3x3 convs keeps the activations' scale; the residual branch's last conv starts 10x smaller,
  # so the block starts near the identity.
  he = (2.0 / (9 * stem_width)) ** 0.5
  return {"stem": _conv_specs(channels, stem_width, (2.0 / (9 * channels)) ** 0.5),
          "res_1": _conv_specs(stem_width, stem_width, he), "res_2": _conv_specs(stem_width, stem_width, he * 0.1),
          **projection(stem_width)}


def _conv(x: jax.Array, params: dict, dtype) -> jax.Array:
  out = jax.lax.conv_general_dilated(x, params["conv_kernel"].astype(dtype), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return out + params["conv_bias"].astype(dtype)


def conv_stem(patches: jax.Array, params: dict, patch_size: int, channels: int, dtype) -> jax.Array:
  """[batch, patches, patch pixels] -> pooled stem features [batch, patches, stem_width], each patch alone."""
  b, n, _ = patches.shape
  x = patches.reshape(b * n, patch_size, patch_size, channels).astype(dtype)
  x = jax.nn.relu(_conv(x, params["stem"], dtype))
  x = jax.nn.relu(x + _conv(jax.nn.relu(_conv(x, params["res_1"], dtype)), params["res_2"], dtype))
  return x.mean(axis=(1, 2)).reshape(b, n, -1)


def encode(inputs: jax.Array, params: dict, encoder: str, *, patch_size: int, channels: int, dtype) -> jax.Array:
  """Patch vectors [batch, patches, embed] from images [batch, h, w, c] (linear, conv) or precomputed features
  [batch, patches, feature_dim] (features)."""
  if encoder == "features":
    return layers.dense(inputs, params, "proj", dtype)
  patches = patchify(inputs, patch_size)
  if encoder == "conv":
    patches = conv_stem(patches, params, patch_size, channels, dtype)
  return layers.dense(patches, params, "proj", dtype)
