"""Building the TFDS datasets into a data_dir and reading their splits as random-access sources.

Dataset names: `peoples_daily_1998`, `review_sentiment` (the embedded demo corpora), `shapes_captions`,
`digits_captions`, `sample_photos` (the embedded image-text sets, image_builders.py; the `images` extra),
`text_corpus/<config name>` (a user corpus, built with build_text_corpus) and `kg_triples/<config name>`
(knowledge-graph triples: the KGs in the pykeen wheel, or a user's built with triples.build_triples_dataset).
Everything is array_record; no TensorFlow is needed.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from typing import Any

import gin
import tensorflow_datasets as tfds
from absl import logging
from array_record.python import array_record_module

from cpm_jax import logging_setup
from cpm_jax.data import builders, image_builders, triples

DEMO_BUILDERS = {cls.name: cls for cls in (builders.PeoplesDaily1998, builders.ReviewSentiment)}
IMAGE_BUILDERS = {cls.name: cls for cls in (image_builders.ShapesCaptions, image_builders.DigitsCaptions,
                                            image_builders.SamplePhotos)}
EMBEDDED_BUILDERS = {**DEMO_BUILDERS, **IMAGE_BUILDERS}  # built from installed packages' files on first use


def _prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Builds the dataset once (a no-op when prepared), logging one line instead of TFDS's download banner (these
  builders download nothing) and its progress bars off a terminal."""
  if builder.is_prepared():
    return builder
  start = time.perf_counter()
  tfds.display_progress_bar(logging_setup.is_terminal())
  with contextlib.redirect_stdout(io.StringIO()):  # "Downloading and preparing dataset Unknown size ..."
    builder.download_and_prepare(file_format="array_record")
  splits = ", ".join(f"{name} {split.num_examples}" for name, split in builder.info.splits.items())
  logging.info("Built %s (%s examples) in %s in %.1f s.", builder.name, splits, builder.data_dir,
               time.perf_counter() - start)
  return builder


def build_demo_dataset(name: str, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """Builds an embedded dataset (EMBEDDED_BUILDERS) from the installed packages' files (once)."""
  if name not in EMBEDDED_BUILDERS:
    raise ValueError(f"Unknown demo dataset {name!r}; expected one of {sorted(EMBEDDED_BUILDERS)}.")
  return _prepare(EMBEDDED_BUILDERS[name](data_dir=os.fspath(data_dir), file_format="array_record"))


@gin.configurable
def build_text_corpus(path: str | os.PathLike, data_dir: str | os.PathLike, *, name: str = "default",
                      txt_document: str = "block", text_field: str = "text", lenient: bool = False,
                      validation_every: int = 0) -> tfds.core.DatasetBuilder:
  """Builds the user corpus at `path` as `text_corpus/<name>` (arguments as in builders.TextCorpusConfig)."""
  config = builders.TextCorpusConfig(name=name, path=os.fspath(path), txt_document=txt_document,
                                     text_field=text_field, lenient=lenient, validation_every=validation_every)
  return _prepare(builders.TextCorpus(config=config, data_dir=os.fspath(data_dir), file_format="array_record"))


def dataset_builder(name: str, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """The prepared builder of a dataset: the embedded corpora and image sets and the KGs shipped in the pykeen wheel
  are built on first use; a `text_corpus/<name>` or `kg_triples/<name>` of your own must have been built before."""
  data_dir = os.fspath(data_dir)
  if name in EMBEDDED_BUILDERS:
    return build_demo_dataset(name, data_dir)
  if name in triples.SHIPPED_DATASETS:
    return triples.build_shipped_dataset(name, data_dir)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise FileNotFoundError(f"Dataset {name!r} is not built in data_dir {data_dir!r} (build a user corpus with "
                            "cpm_jax.data.build_text_corpus or experiments/build_datasets.py, triple files with "
                            "cpm_jax.data.triples.build_triples_dataset).") from e


@gin.configurable
def load_split(name: str, split: str, data_dir: str | os.PathLike) -> Any:
  """A split as a random-access source (len, [i] -> dict of numpy values; text is UTF-8 bytes) for Grain
  (built on demand as `dataset_builder` says)."""
  builder = dataset_builder(name, data_dir)
  if split not in builder.info.splits:
    raise ValueError(f"Dataset {name!r} in {data_dir} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  _check_shards(builder, split)
  return builder.as_data_source(split=split)


def _check_shards(builder: tfds.core.DatasetBuilder, split: str) -> None:
  """Opens every array_record shard of the split (its footer and index: cheap): a truncated or overwritten shard,
  or one holding another number of records than the dataset's info says, is a ValueError naming the file (reading
  would otherwise fail later, deep in a data loader, with Riegeli's message and no file name)."""
  info = builder.info.splits[split]
  for path, expected in zip(info.filepaths, info.shard_lengths):
    try:
      reader = array_record_module.ArrayRecordReader(os.fspath(path))
      records = reader.num_records()
      reader.close()  # a damaged footer raises here at the latest
    except RuntimeError as e:
      records, reason = None, str(e).splitlines()[0]
    else:
      reason = f"{records} records, the dataset's info says {expected}"
    if records != expected:
      raise ValueError(f"{path}: a damaged shard of dataset {builder.name!r} ({reason}); rebuild the dataset (remove "
                       f"{builder.data_dir} and build it again).")


def as_text(value: Any) -> str:
  """A text field as str: a TFDS record's UTF-8 bytes decoded; a jsonl example's value as it is written."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_examples(name: str, split: str, data_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """All examples of a split, in stored order, with text decoded to str (review_sentiment: text + int label); a
  kg_triples split's examples are its triples, {"head", "relation", "tail"} ids (its records are blocks of them)."""
  source = load_split(name, split, data_dir)
  records = source.__getitems__(range(len(source)))
  if triples.is_triples_dataset(name):
    return [{"head": int(h), "relation": int(r), "tail": int(t)} for h, r, t in triples.as_array(records)]
  return [{key: as_text(value) if isinstance(value, bytes) else value for key, value in example.items()}
          for example in records]
