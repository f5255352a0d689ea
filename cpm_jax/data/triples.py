"""Knowledge-graph triple files (head \\t relation \\t tail per line) as a TFDS dataset (array_record, no TensorFlow).

`kg_triples/<config>` holds the (head, relation, tail) ids of a split in file order, in records of
TriplesConfig.block_triples (default `BLOCK_TRIPLES`) triples, each one int32 [n, 3] array stored as raw bytes, so a
split reads at once (one decoded record per triple would take hours for Wikidata's 477M), and, in its metadata, the
entity and relation names in id order (sorted names over all splits, the ids PyKEEN's TriplesFactory gives when
every entity occurs in training). Splits: train.txt -> train, valid.txt -> validation, test.txt -> test (the last two
when present).

Configs `nations`, `kinships` and `umls` read the three real KGs shipped inside the installed `pykeen` package
(pykeen/datasets/<name>/{train,valid,test}.txt; nothing is downloaded; sources.load_split builds them on first use);
`build_triples_dataset(path, data_dir, name=..., block_triples=...)` builds a user's folder of triple files.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

PYKEEN_DATASETS = ("nations", "kinships", "umls")
SPLIT_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
BLOCK_TRIPLES = 1 << 16  # triples per record


def pykeen_dataset_dir(name: str) -> pathlib.Path:
  """The folder of one of the KGs inside the installed pykeen package (the `test` extra installs it)."""
  if name not in PYKEEN_DATASETS:
    raise ValueError(f"Unknown PyKEEN dataset {name!r}; the pykeen wheel ships {list(PYKEEN_DATASETS)}.")
  try:
    folder = importlib.resources.files("pykeen.datasets") / name
  except ModuleNotFoundError as e:
    raise ModuleNotFoundError(f"kg_triples/{name} reads the files inside the pykeen package: pip install pykeen "
                              "(the `test` extra of cpm_jax).") from e
  return pathlib.Path(os.fspath(folder))


def read_triples_file(path: str | os.PathLike) -> list[tuple[str, str, str]]:
  """The (head, relation, tail) names of a tab-separated triple file; a malformed line is an error naming it."""
  triples = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) != 3:
        raise ValueError(f"{path}:{number}: expected 'head<TAB>relation<TAB>tail', got {len(fields)} fields "
                         f"({line.rstrip()[:80]!r}).")
      triples.append(tuple(fields))
  return triples


@dataclasses.dataclass(eq=False)
class TriplesConfig(tfds.core.BuilderConfig):
  """A folder holding train.txt (and optionally valid.txt, test.txt); empty: the pykeen KG named like the config.
  block_triples: triples per record."""

  path: str = ""
  block_triples: int = BLOCK_TRIPLES


class KGTriples(tfds.core.GeneratorBasedBuilder):
  """Triples of a knowledge graph as entity / relation ids; the names are in info.metadata."""

  name = "kg_triples"
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"2.0.0": "Records are blocks of BLOCK_TRIPLES triples (1.0.0: one record per triple)."}
  BUILDER_CONFIGS = [TriplesConfig(name=name, description=f"PyKEEN's {name} (from the pykeen wheel)")
                     for name in PYKEEN_DATASETS]

  def _info(self) -> tfds.core.DatasetInfo:
    block = tfds.features.Tensor(shape=(None, 3), dtype=np.int32, encoding=tfds.features.Encoding.BYTES)
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__, homepage="https://github.com/pykeen/pykeen",
        features=tfds.features.FeaturesDict({"triples": block}),
        metadata=tfds.core.MetadataDict(), disable_shuffling=True)

  def _split_generators(self, dl_manager):
    folder = pathlib.Path(self.builder_config.path) if self.builder_config.path else \
        pykeen_dataset_dir(self.builder_config.name)
    if not (folder / SPLIT_FILES["train"]).is_file():
      raise FileNotFoundError(f"kg_triples/{self.builder_config.name}: {folder / SPLIT_FILES['train']} is missing "
                              "(a triples folder holds train.txt and optionally valid.txt, test.txt).")
    splits = {split: read_triples_file(folder / file) for split, file in SPLIT_FILES.items()
              if (folder / file).is_file()}
    entities = sorted({name for triples in splits.values() for h, _, t in triples for name in (h, t)})
    relations = sorted({r for triples in splits.values() for _, r, _ in triples})
    self.info.metadata.update(entities=entities, relations=relations)
    entity_ids = {name: i for i, name in enumerate(entities)}
    relation_ids = {name: i for i, name in enumerate(relations)}
    return {split: self._generate_examples(triples, entity_ids, relation_ids) for split, triples in splits.items()}

  def _generate_examples(self, triples, entity_ids, relation_ids):
    size = self.builder_config.block_triples
    for i, start in enumerate(range(0, len(triples), size)):
      block = [(entity_ids[h], relation_ids[r], entity_ids[t]) for h, r, t in triples[start:start + size]]
      yield i, {"triples": np.asarray(block, np.int32).reshape(-1, 3)}


SHIPPED_DATASETS = tuple(f"{KGTriples.name}/{name}" for name in PYKEEN_DATASETS)


def is_triples_dataset(name: str) -> bool:
  """Whether dataset `name` (e.g. "kg_triples/umls") is one of this builder's."""
  return name.split("/", 1)[0] == KGTriples.name


def build_shipped_dataset(name: str, data_dir: str | os.PathLike) -> tfds.core.DatasetBuilder:
  """Builds kg_triples/<nations|kinships|umls> from the installed pykeen wheel (once)."""
  if name not in SHIPPED_DATASETS:
    raise ValueError(f"{name!r} is none of the KGs shipped in the pykeen wheel ({list(SHIPPED_DATASETS)}).")
  builder = KGTriples(config=name.split("/", 1)[1], data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare(file_format="array_record")  # no-op when already prepared
  return builder


def build_triples_dataset(path: str | os.PathLike, data_dir: str | os.PathLike, *, name: str = "default",
                          block_triples: int = BLOCK_TRIPLES) -> tfds.core.DatasetBuilder:
  """Builds the triple files in folder `path` as kg_triples/<name> in data_dir, block_triples triples a record."""
  config = TriplesConfig(name=name, path=os.fspath(path), block_triples=block_triples)
  builder = KGTriples(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare(file_format="array_record")
  return builder


def as_array(records) -> np.ndarray:
  """A split's records (blocks of triples, in order) as one int32 [n, 3] array of (head, relation, tail) ids."""
  return np.concatenate([np.zeros((0, 3), np.int32)] + [record["triples"] for record in records])
