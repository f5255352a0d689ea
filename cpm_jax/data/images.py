"""Image preprocessing in numpy: area resampling, grey to RGB, and the float input an image model takes.

Stored images keep their own sizes (8x8 digits, 32x32 shapes, 64x64 photo crops); models resize them with
`model_input` to their configured size, in the data pipeline and at evaluation alike.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def area_weights(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of area resampling along one axis: each output pixel averages the input pixels
  its interval covers, by overlap (an integer upscale repeats pixels; an integer downscale averages blocks)."""
  if size_in < 1 or size_out < 1:
    raise ValueError(f"area_weights: sizes must be positive, got {size_in} -> {size_out}.")
  scale = size_in / size_out
  starts = np.arange(size_out)[:, None] * scale
  pixels = np.arange(size_in)[None, :]
  overlap = np.clip(np.minimum(starts + scale, pixels + 1) - np.maximum(starts, pixels), 0, None)
  return (overlap / scale).astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """[h, w, c] -> float32 [size, size, c] by area resampling (separable: rows, then columns)."""
  rows, cols = area_weights(image.shape[0], size), area_weights(image.shape[1], size)
  resized_rows = np.tensordot(rows, image.astype(np.float32), axes=(1, 0))  # [size, w, c]
  return np.einsum("owc,pw->opc", resized_rows, cols)


def to_rgb(image: np.ndarray) -> np.ndarray:
  """[h, w] or [h, w, 1] grey -> [h, w, 3]; RGB unchanged; RGBA loses alpha."""
  if image.ndim == 2:
    image = image[:, :, None]
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] not in (3, 4):
    raise ValueError(f"Expected a grey, RGB or RGBA image; got shape {image.shape}.")
  return image[:, :, :3]


def read_file(path: str) -> np.ndarray:
  """An image file (PNG, JPEG, ...) as a stored uint8 array [h, w, c] (scikit-image's reader: the `images` extra);
  a ValueError naming the file if it is not a readable image."""
  from skimage import io  # the `images` extra
  try:
    return np.asarray(io.imread(path))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable image file ({e}).") from e


def model_input(image: np.ndarray, size: int) -> np.ndarray:
  """A stored uint8 image as a model reads it: RGB, resized to [size, size, 3], float32 in [-1, 1]."""
  return resize(to_rgb(np.asarray(image)), size) / 127.5 - 1.0
