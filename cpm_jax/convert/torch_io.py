"""Reading torch checkpoint files safely (weights-only, memory-mapped) and moving tensors to/from numpy.

torch is imported lazily: converting safetensors or Orbax checkpoints does not need it.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import zipfile

import numpy as np
from jax.numpy import bfloat16

from cpm_jax.convert.common import ConversionError


def _safe_globals() -> list:
  """Harmless globals found in Megatron/DeepSpeed checkpoints (numpy RNG states, argparse args)."""
  multiarray = np._core.multiarray
  return [multiarray._reconstruct, (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
          multiarray.scalar, (multiarray.scalar, "numpy.core.multiarray.scalar"),
          np.ndarray, np.dtype, *(getattr(np.dtypes, name) for name in np.dtypes.__all__),
          argparse.Namespace]


def load(path: str | os.PathLike, trust_pickle: bool = False) -> dict:
  """torch.load onto the CPU: memory-mapped for zip-format files, weights-only unless `trust_pickle`.

  Raises ConversionError naming the file when it is missing, not a torch pickle, or holds Python
  objects that weights-only loading refuses (pass trust_pickle=True only for files you trust).
  """
  import torch

  path = pathlib.Path(path)
  if not path.is_file():
    raise ConversionError(f"{path}: no such file.")
  try:
    with torch.serialization.safe_globals(_safe_globals()):
      state = torch.load(path, map_location="cpu", mmap=zipfile.is_zipfile(path), weights_only=not trust_pickle)
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


def to_numpy(tensor) -> np.ndarray:
  """A CPU tensor as a numpy array sharing its memory (bfloat16 via ml_dtypes)."""
  import torch

  tensor = tensor.detach()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(bfloat16)
  return tensor.numpy()


def from_numpy(array: np.ndarray):
  """A contiguous torch tensor owning a copy of `array` (bfloat16 via ml_dtypes)."""
  import torch

  array = np.array(array, order="C")
  if array.dtype == bfloat16:
    return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(array)
