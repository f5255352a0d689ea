"""Reading the weights of a Hugging Face model directory, tensor by tensor, whatever its files: model.safetensors
or pytorch_model.bin, or their sharded *.index.json forms."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from cpm_jax.convert import safetensors_io, torch_io
from cpm_jax.convert.common import ConversionError, KeyLedger

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class Weights:
  """The tensors of a HF model directory, each read when asked for with plain file reads."""

  def __init__(self, directory: pathlib.Path, trust_pickle: bool = False):
    name = next((name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if name is None:
      raise ConversionError(f"{directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)}.")
    files = None
    if name.endswith(".index.json"):
      try:
        files = json.loads((directory / name).read_text()).get("weight_map")
      except (ValueError, AttributeError) as e:
        raise ConversionError(f"{directory / name}: not a JSON weight index ({e}).") from e
      if not files:
        raise ConversionError(f"{directory / name}: no 'weight_map'.")
    readers, specs = {}, {}
    self._file_of = {}
    for file in sorted(set(files.values())) if files else [name]:
      path = directory / file
      if file.endswith(".safetensors"):
        reader = safetensors_io.Reader(path)
        readers[file] = reader.read
        specs.update({key: (reader.shape(key), reader.dtype(key)) for key in reader.keys()})
      else:
        tensor_file = torch_io.TensorFile(path, trust_pickle)
        not_tensors = [key for key, value in tensor_file.state.items() if not hasattr(value, "untyped_storage")]
        if not_tensors:
          raise ConversionError(f"{path}: entries {not_tensors[:4]} are not tensors; expected a state dict.")
        readers[file] = lambda key, tensor_file=tensor_file: tensor_file.read(tensor_file.state[key])
        specs.update({key: (tuple(t.shape), torch_io.numpy_dtype(t)) for key, t in tensor_file.state.items()})
      self._file_of.update({key: file for key in specs if key not in self._file_of})
    self._directory, self._readers, self._specs = directory, readers, specs
    self.ledger = KeyLedger(self._file_of, str(directory))

  def read(self, key: str) -> tuple[np.ndarray, str]:
    """(array, "file: key")."""
    self.ledger.take(key)
    file = self._file_of[key]
    return self._readers[file](key), f"{self._directory / file}: {key}"

  def keys(self) -> list[str]:
    return list(self._file_of)

  def spec(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of `key` without reading it."""
    if key not in self._specs:
      raise ConversionError(f"{self._directory}: missing key {key!r}; not a checkpoint of this model?")
    return self._specs[key]
