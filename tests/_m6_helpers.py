"""Session fixture for the M6 data and training tests: a data_dir with a small shapes_captions (the real builder's
scenes, fewer of them), the real digits_captions and peoples_daily_1998, and a character vocabulary over them;
built once per test run and shared by pytest-xdist workers."""

import pathlib

import pytest

from _data_helpers import _shared
from cpm_jax.data import image_builders, sources
from cpm_jax.models.m6 import data, vocab


class SmallShapes(image_builders.ShapesCaptions, skip_registration=True):
  """shapes_captions with the first scenes of each split only (same seeds, so the same scenes)."""

  name = "shapes_captions"
  SPLITS = {"train": (0, 96), "validation": (1, 24), "test": (2, 24)}


VOCAB_SIZE = 512
TASKS = ("shapes_caption", "shapes_vqa", "digits_caption", "text_prefix_lm", "text_lm")


@pytest.fixture(scope="session")
def m6_data_dir(tmp_path_factory) -> pathlib.Path:
  with _shared(tmp_path_factory, "m6_tfds") as data_dir:
    SmallShapes(data_dir=str(data_dir), file_format="array_record").download_and_prepare(file_format="array_record")
    for name in ("digits_captions", "peoples_daily_1998"):
      sources.build_demo_dataset(name, data_dir)
    path = data_dir / "chars.txt"
    if not path.exists():
      required = [record[field].decode() for name, fields in data.IMAGE_DATASETS.items() if name != "sample_photos"
                  for record in sources.load_split(name, "train", data_dir) for field in fields]
      others = [e["text"] for e in sources.load_examples("peoples_daily_1998", "train", data_dir)[:3000]]
      vocab.build(required, others, path, VOCAB_SIZE)
  return data_dir
