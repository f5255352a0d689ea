"""Streaming safetensors: read one tensor at a time with plain file reads, write tensor by tensor.

The `safetensors` package memory-maps whole files (every tensor read stays resident) and its writer
needs every tensor in memory at once; the format is simple enough to stream instead:
8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw bytes.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Iterable, Sequence

import numpy as np
from jax.numpy import bfloat16

from cpm_jax.convert.common import ConversionError, read_at

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_NAMES = {np.dtype(dtype): name for name, dtype in DTYPES.items()}


class Reader:
  """The tensors of one .safetensors file, read on demand (no memory map, nothing kept)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    try:
      with open(self.path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
      raise ConversionError(f"{self.path} is not a safetensors file: {type(e).__name__}: {e}") from e
    self.metadata = header.pop("__metadata__", {})
    self._start = 8 + length
    self._entries = header
    for name, entry in header.items():
      if entry.get("dtype") not in DTYPES:
        raise ConversionError(f"{self.path}: tensor {name!r} has dtype {entry.get('dtype')!r}; "
                              f"supported: {sorted(DTYPES)}.")

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entries[name]["shape"])

  def dtype(self, name: str) -> np.dtype:
    return np.dtype(DTYPES[self._entries[name]["dtype"]])

  def read(self, name: str) -> np.ndarray:
    entry = self._entries[name]
    begin, end = entry["data_offsets"]
    array = np.empty(entry["shape"], DTYPES[entry["dtype"]])
    if array.nbytes != end - begin:
      raise ConversionError(f"{self.path}: tensor {name!r} of shape {entry['shape']} ({entry['dtype']}) "
                            f"spans {end - begin} bytes, expected {array.nbytes}.")
    return read_at(self.path, self._start + begin, array, f"tensor {name!r}")


def write(path: str | os.PathLike, specs: Sequence[tuple[str, np.dtype, tuple[int, ...]]],
          arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None) -> None:
  """Writes tensors declared up front in `specs` (name, dtype, shape), taking `arrays` in the same order.

  Only one array is needed at a time, so `arrays` can be a generator producing them on demand.
  """
  header: dict = {"__metadata__": dict(metadata or {})}
  offset = 0
  for name, dtype, shape in specs:
    size = math.prod(shape) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for (name, dtype, shape), array in zip(specs, arrays, strict=True):
      if array.dtype != np.dtype(dtype) or tuple(array.shape) != tuple(shape):
        raise ValueError(f"safetensors write {path}: tensor {name!r} is {array.dtype}{list(array.shape)}, "
                         f"declared {np.dtype(dtype)}{list(shape)}.")
      f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
