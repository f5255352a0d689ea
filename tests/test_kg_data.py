"""KG data: the kg_triples TFDS builder (a user's triple files and PyKEEN's shipped KGs) and the Grain triple
pipeline (epochs, process shares, exact resume)."""

import numpy as np
import pytest

from cpm_jax.data import triples as triple_files
from cpm_jax.models.kg import data as kg_data
from cpm_jax.models.kg.vocabulary import KGVocabulary


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_builder_reads_triple_files_into_ids_and_names(tmp_path, data_dir):
  folder = tmp_path / "kg"
  folder.mkdir()
  (folder / "train.txt").write_text("paris\tcapital_of\tfrance\nberlin\tcapital_of\tgermany\n\nparis\tnear\tberlin\n")
  (folder / "test.txt").write_text("bonn\tin\tgermany\n")
  triple_files.build_triples_dataset(folder, data_dir, name="capitals", block_triples=2)  # train: 2 records
  vocabulary = KGVocabulary(kg_data.dataset_directory("kg_triples/capitals", data_dir))
  entities, relations = vocabulary.entities, vocabulary.relations
  assert entities == ["berlin", "bonn", "france", "germany", "paris"] and relations == ["capital_of", "in", "near"]
  train = kg_data.load_triples("kg_triples/capitals", "train", data_dir)
  assert [(entities[h], relations[r], entities[t]) for h, r, t in train] == [
      ("paris", "capital_of", "france"), ("berlin", "capital_of", "germany"), ("paris", "near", "berlin")]
  assert kg_data.load_triples("kg_triples/capitals", "test", data_dir).tolist() == [[1, 1, 3]]
  with pytest.raises(ValueError, match="has no split 'validation'"):
    kg_data.load_triples("kg_triples/capitals", "validation", data_dir)


def test_malformed_line_names_file_and_line(tmp_path):
  path = tmp_path / "train.txt"
  path.write_text("a\tb\tc\na\tb\n")
  with pytest.raises(ValueError, match=r"train.txt:2: expected 'head<TAB>relation<TAB>tail', got 2 fields"):
    triple_files.read_triples_file(path)


def test_pykeens_umls_is_read_from_the_installed_wheel_with_pykeens_ids(data_dir):
  from pykeen.datasets import UMLS
  reference = UMLS()
  vocabulary = KGVocabulary(kg_data.dataset_directory("kg_triples/umls", data_dir))
  entities, relations = vocabulary.entities, vocabulary.relations
  assert (len(entities), len(relations)) == (135, 46)  # FORMATS.md
  splits = {s: kg_data.load_triples("kg_triples/umls", s, data_dir) for s in ("train", "validation", "test")}
  assert sum(len(t) for t in splits.values()) == 6529
  assert entities == sorted(reference.training.entity_to_id, key=reference.training.entity_to_id.get)
  for ours, theirs in ((splits["train"], reference.training), (splits["test"], reference.testing)):
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(theirs.mapped_triples.numpy(), axis=0))


TRIPLES = np.random.default_rng(0).integers(0, 1000, (103, 3)).astype(np.int32)


def _rows(batch):
  return np.stack([batch["heads"], batch["relations"], batch["tails"]], 1)


def test_each_epoch_is_a_fresh_permutation_of_whole_batches():
  iterator = kg_data.make_triple_iterator(TRIPLES, 20, seed=1)
  epochs = [np.concatenate([_rows(next(iterator)) for _ in range(5)]) for _ in range(2)]  # 5 batches per epoch
  for epoch in epochs:
    assert len(np.unique(epoch, axis=0)) == 100  # 100 distinct triples of the 103: the remainder is dropped
    assert {tuple(t) for t in epoch} <= {tuple(t) for t in TRIPLES}
  assert not np.array_equal(epochs[0], epochs[1])


def test_process_shares_make_up_the_same_global_batch():
  single = kg_data.make_triple_iterator(TRIPLES, 20, seed=3)
  shares = [kg_data.make_triple_iterator(TRIPLES, 20, seed=3, process_index=p, process_count=4) for p in range(4)]
  for _ in range(7):
    np.testing.assert_array_equal(np.concatenate([_rows(next(share)) for share in shares]), _rows(next(single)))


def test_iterator_resumes_exactly_from_its_state():
  iterator = kg_data.make_triple_iterator(TRIPLES, 20, seed=2)
  for _ in range(4):
    next(iterator)
  state = iterator.get_state()
  expected = [_rows(next(iterator)) for _ in range(6)]  # crosses into the next epoch
  resumed = kg_data.make_triple_iterator(TRIPLES, 20, seed=2)
  resumed.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(_rows(next(resumed)), want)


def test_eval_batches_cover_every_triple_once_with_padding_weighted_zero():
  batches = list(kg_data.eval_triple_batches(TRIPLES, 20, process_index=1, process_count=2))
  assert len(batches) == 6 and all(len(b["heads"]) == 10 for b in batches)
  assert batches[-1]["weights"].tolist() == [0.0] * 10  # rows 110-119 of 103: all padding on process 1
  rows = np.concatenate([_rows(b)[b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(rows, np.concatenate([TRIPLES[i + 10:i + 20] for i in range(0, 100, 20)]))
