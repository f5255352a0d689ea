"""torch checkpoint files, safely (weights-only) and tensor by tensor: read without keeping pages mapped, written
without holding a file's tensors in memory.

torch is imported lazily: converting safetensors or Orbax checkpoints does not need it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import zipfile
from typing import Any

import numpy as np
from jax.numpy import bfloat16

from cpm_jax.convert.common import ConversionError, read_at, write_at

# torch dtype (by name, so that importing this module does not import torch) -> numpy dtype
NUMPY_DTYPES = {"torch.float64": np.float64, "torch.float32": np.float32, "torch.float16": np.float16,
                "torch.bfloat16": bfloat16, "torch.int64": np.int64, "torch.int32": np.int32,
                "torch.int16": np.int16, "torch.int8": np.int8, "torch.uint8": np.uint8, "torch.bool": np.bool_}


def _safe_globals() -> list:
  """Harmless globals found in Megatron/DeepSpeed checkpoints (numpy RNG states, argparse args)."""
  multiarray = np._core.multiarray
  return [multiarray._reconstruct, (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
          multiarray.scalar, (multiarray.scalar, "numpy.core.multiarray.scalar"),
          np.ndarray, np.dtype, *(getattr(np.dtypes, name) for name in np.dtypes.__all__),
          argparse.Namespace]


def load(path: str | os.PathLike, trust_pickle: bool = False, *, meta: bool = False) -> dict:
  """torch.load: weights-only unless `trust_pickle`; tensors on the meta device (shape, dtype and where their bytes
  lie, nothing read) if `meta`, else on the CPU (memory-mapped for zip-format files).

  Raises ConversionError naming the file when it is missing, not a torch pickle, or holds Python
  objects that weights-only loading refuses (pass trust_pickle=True only for files you trust).
  """
  import torch

  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"{path}: no such file.")
  try:
    with torch.serialization.safe_globals(_safe_globals()):
      state = torch.load(path, map_location="meta" if meta else "cpu", mmap=not meta and zipfile.is_zipfile(path),
                         weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = next((line for line in lines if "Unsupported global" in line), None)
    if reason is None:  # e.g. "Unsupported operand 103": the bytes are no pickle at all
      detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
      raise ConversionError(f"{path} is not a torch checkpoint (torch.save pickle): {detail}") from e
    raise ConversionError(f"{path}: weights-only loading refused a Python object ({reason}). If you trust this "
                          "file, convert with --trust_pickle (trust_pickle=True).") from e
  except Exception as e:  # torch raises KeyError, EOFError, RuntimeError, ... for non-checkpoint files
    raise ConversionError(f"{path} is not a torch checkpoint (torch.save pickle): "
                          f"{type(e).__name__}: {e}") from e
  if not isinstance(state, dict):
    raise ConversionError(f"{path}: expected a dict of tensors, found a {type(state).__name__}.")
  return state


def numpy_dtype(tensor) -> np.dtype:
  """The numpy dtype of a torch tensor's dtype (bfloat16 via ml_dtypes)."""
  if str(tensor.dtype) not in NUMPY_DTYPES:
    raise ConversionError(f"tensor dtype {tensor.dtype} is not supported; expected one of {sorted(NUMPY_DTYPES)}.")
  return np.dtype(NUMPY_DTYPES[str(tensor.dtype)])


def to_numpy(tensor) -> np.ndarray:
  """A CPU tensor as a numpy array sharing its memory (bfloat16 via ml_dtypes)."""
  import torch

  tensor = tensor.detach()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(bfloat16)
  return tensor.numpy()


def placeholder(shape: tuple[int, ...], dtype: np.dtype):
  """An unwritten CPU tensor of `shape` and `dtype` for `save_placeholders` (its memory is never touched)."""
  import torch

  by_name = {np.dtype(value): name for name, value in NUMPY_DTYPES.items()}
  return torch.empty(shape, dtype=getattr(torch, by_name[np.dtype(dtype)].removeprefix("torch.")))


def save_placeholders(path: str | os.PathLike, state: dict) -> None:
  """torch.save of `state` (tensors made by `placeholder`) with room reserved for every tensor's bytes, none written
  (torch.serialization.skip_data): `TensorFile(path, writable=True).write` fills them in."""
  import torch

  with torch.serialization.skip_data():
    torch.save(state, path)


class TensorFile:
  """One torch.save file whose tensors are read (or written) one at a time.

  A zip-format file (what torch >= 1.6, Megatron, DeepSpeed and transformers write) is unpickled onto the meta device:
  `state` then holds every tensor's shape, dtype and byte offset, and `read` reads one tensor with plain file reads,
  so no page stays mapped (a memory-mapped checkpoint's pages count in the process's memory once read).
  A legacy (pre-zip) file is loaded whole.
  """

  def __init__(self, path: str | os.PathLike, trust_pickle: bool = False, writable: bool = False):
    self.path = pathlib.Path(path)
    self._in_file = zipfile.is_zipfile(self.path)
    self._writable = writable
    self.state = load(self.path, trust_pickle, meta=self._in_file)

  def read(self, tensor) -> np.ndarray:
    """A C-contiguous host array of `tensor` (one of `state`'s tensors) that owns its memory."""
    if not self._in_file:
      return np.array(to_numpy(tensor), order="C")
    dtype = numpy_dtype(tensor)
    start = self._offset(tensor)
    if tensor.is_contiguous():
      return read_at(self.path, start + tensor.storage_offset() * dtype.itemsize,
                     np.empty(tuple(tensor.shape), dtype), f"tensor of shape {tuple(tensor.shape)}")
    storage = read_at(self.path, start, np.empty(tensor.untyped_storage().nbytes(), np.uint8), "tensor storage")
    return np.lib.stride_tricks.as_strided(
        storage[tensor.storage_offset() * dtype.itemsize:].view(dtype), tuple(tensor.shape),
        tuple(stride * dtype.itemsize for stride in tensor.stride())).copy()

  def write(self, tensor, array: np.ndarray) -> None:
    """Writes `array` as the bytes of `tensor`, a contiguous tensor of a file from `save_placeholders`."""
    if not (self._writable and self._in_file and tensor.is_contiguous()):
      raise ValueError(f"{self.path}: not a placeholder file opened for writing.")
    if tuple(array.shape) != tuple(tensor.shape) or array.dtype != numpy_dtype(tensor):
      raise ValueError(f"{self.path}: array {array.dtype}{list(array.shape)} written into a tensor "
                       f"{tensor.dtype}{list(tensor.shape)}.")
    write_at(self.path, self._offset(tensor) + tensor.storage_offset() * array.dtype.itemsize, array)

  def _offset(self, tensor: Any) -> int:
    offset = getattr(tensor.untyped_storage(), "_checkpoint_offset", None)  # set by torch.load on the meta device
    if offset is None:
      raise ConversionError(f"{self.path}: this torch version does not say where a tensor's bytes lie in the file "
                            "(torch.load on the meta device); install torch>=2.6.")
    return offset
