"""Entity and relation names of a KG model (the family's "tokenizer"), read from a vocabulary folder: a CPM-KG
release (ent2id.txt, rel2id.txt) or a built kg_triples dataset (its metadata.json lists the names in id order)."""

from __future__ import annotations

import functools
import json
import os
import pathlib

from cpm_jax.models.kg import release


class KGVocabulary:
  """Names <-> ids of entities and relations, loaded on first use (a release names 85M entities)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if not ((self.path / release.ENTITY_IDS).is_file() or (self.path / "metadata.json").is_file()):
      raise FileNotFoundError(f"KG vocabulary {self.path}: neither a CPM-KG release ({release.ENTITY_IDS}, "
                              f"{release.RELATION_IDS}) nor a built kg_triples dataset (metadata.json).")

  @functools.cached_property
  def _names(self) -> tuple[list[str], list[str]]:
    if (self.path / release.ENTITY_IDS).is_file():
      return (release.read_names(self.path / release.ENTITY_IDS), release.read_names(self.path / release.RELATION_IDS))
    metadata = json.loads((self.path / "metadata.json").read_text(encoding="utf-8"))
    if "entities" not in metadata or "relations" not in metadata:
      raise ValueError(f"{self.path / 'metadata.json'} lists no 'entities' / 'relations' (not a kg_triples dataset).")
    return list(metadata["entities"]), list(metadata["relations"])

  @property
  def entities(self) -> list[str]:
    return self._names[0]

  @property
  def relations(self) -> list[str]:
    return self._names[1]

  @functools.cached_property
  def _ids(self) -> tuple[dict[str, int], dict[str, int]]:
    return {n: i for i, n in enumerate(self.entities)}, {n: i for i, n in enumerate(self.relations)}

  def entity_id(self, name: str, where: str) -> int:
    if name not in self._ids[0]:
      raise ValueError(f"{where}: entity {name!r} is not in the vocabulary {self.path} ({len(self.entities)} entities).")
    return self._ids[0][name]

  def relation_id(self, name: str, where: str) -> int:
    if name not in self._ids[1]:
      raise ValueError(f"{where}: relation {name!r} is not in the vocabulary {self.path} (relations: "
                     f"{self.relations[:5]}{' ...' if len(self.relations) > 5 else ''}).")
    return self._ids[1][name]
