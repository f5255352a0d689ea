"""The CPM-KG release format: fake releases written page by page as the release lays them out, read into sharded
params (streaming: the host holds about one page), written back, and converted to a params checkpoint."""

import dataclasses
import tracemalloc

import numpy as np
import pytest

from cpm_jax import checkpointing, partitioning
from cpm_jax.models import kg, registry
from cpm_jax.models.kg import release
from cpm_jax.models.kg.vocabulary import KGVocabulary
from cpm_jax.models.kg.config import KGConfig


@pytest.fixture(scope="module")
def mesh():
  return partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))


def _fake_release(folder, num_entities, num_relations, dim, page_rows, count_line=False, seed=0):
  """A release as TsinghuaAI/CPM-KG lays it out: vectors (entities, then relations) in pages <k>.npy, names in
  OpenKE id files. Returns the vectors."""
  rng = np.random.default_rng(seed)
  vectors = rng.normal(size=(num_entities + num_relations, dim)).astype(np.float32)
  folder.mkdir()
  for page, start in enumerate(range(0, len(vectors), page_rows)):
    np.save(folder / f"{page}.npy", vectors[start:start + page_rows])
  for file, prefix, count in ((release.ENTITY_IDS, "Q", num_entities), (release.RELATION_IDS, "P", num_relations)):
    lines = [f"{prefix}{i}\t{i}\n" for i in range(count)]
    (folder / file).write_text((f"{count}\n" if count_line else "") + "".join(reversed(lines)))
  return vectors[:num_entities], vectors[num_entities:]


@pytest.mark.parametrize("count_line", [False, True])
def test_release_reads_into_sharded_params_with_its_own_counts(tmp_path, mesh, count_line):
  entities, relations = _fake_release(tmp_path / "release", 53, 7, 6, page_rows=10, count_line=count_line)
  params, config = release.read_release(tmp_path / "release", mesh)
  assert (config.num_entities, config.num_relations, config.dim, config.scoring) == (53, 7, 6, "distmult")
  assert params["entities"].sharding.shard_shape(params["entities"].shape) == (config.entity_rows // 8, 6)
  table = np.asarray(params["entities"])
  np.testing.assert_array_equal(table[:53], entities)
  np.testing.assert_array_equal(table[53:], 0.0)  # padding rows
  np.testing.assert_array_equal(np.asarray(params["relations"]), relations)
  assert release.read_names(tmp_path / "release" / release.ENTITY_IDS)[:2] == ["Q0", "Q1"]


def test_release_round_trips_through_the_registry_formats_and_the_writer(tmp_path, mesh):
  entities, relations = _fake_release(tmp_path / "release", 45, 5, 4, page_rows=8)
  formats = registry.formats("kg")
  loaded = formats["cpm_kg"].load(tmp_path / "release", mesh=mesh)  # what convert_checkpoint.py --from=cpm_kg does
  formats["orbax"].save(loaded.params, loaded.config, tmp_path / "ckpt", **loaded.metadata)
  config = loaded.config
  abstract = kg.abstract_params(config)
  shardings = partitioning.tree_shardings(kg.logical_axes(config), mesh, abstract)
  params, metadata = checkpointing.restore_params(tmp_path / "ckpt", abstract, shardings)
  assert metadata["model"] == "kg" and metadata["model_config"] == dataclasses.asdict(config)
  vocabulary = KGVocabulary(metadata["tokenizer"])
  assert vocabulary.entities[:2] == ["Q0", "Q1"] and len(vocabulary.relations) == 5
  np.testing.assert_array_equal(np.asarray(params["entities"])[:45], entities)
  np.testing.assert_array_equal(np.asarray(params["relations"]), relations)

  release.write_release(params, config, tmp_path / "written", page_rows=8, entity_names=vocabulary.entities,
                        relation_names=vocabulary.relations)
  for page in sorted((tmp_path / "release").glob("*.npy")):
    np.testing.assert_array_equal(np.load(tmp_path / "written" / page.name), np.load(page))
  assert release.read_names(tmp_path / "written" / release.RELATION_IDS) == [f"P{i}" for i in range(5)]
  assert not (tmp_path / "written.incomplete").exists()


def test_reading_streams_one_page_at_a_time(tmp_path, mesh):
  page_rows, dim = 2000, 32
  _fake_release(tmp_path / "release", 39_000, 500, dim, page_rows=page_rows)  # 20 pages, 5 MB
  release.read_release(tmp_path / "release", mesh)  # compiles the copies
  tracemalloc.start()
  params, _ = release.read_release(tmp_path / "release", mesh)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  page_bytes = page_rows * dim * 4
  assert params["entities"].nbytes > 15 * page_bytes
  assert peak < 2 * page_bytes, f"host peak {peak} bytes while reading pages of {page_bytes}"


def test_counts_that_disagree_with_the_pages_are_errors(tmp_path, mesh):
  _fake_release(tmp_path / "release", 30, 4, 4, page_rows=10)
  with pytest.raises(ValueError, match=r"KGConfig.num_relations=1228 but the release .* has 4 \(rel2id.txt\)"):
    release.read_release(tmp_path / "release", mesh, config=KGConfig(num_entities=30, num_relations=1228, dim=4))
  (tmp_path / "release" / "3.npy").unlink()
  with pytest.raises(ValueError, match="fill 4 pages of 10 vectors, but the folder holds 3"):
    release.ReleaseLayout.read(tmp_path / "release")
  (tmp_path / "release" / "1.npy").unlink()
  with pytest.raises(ValueError, match=r"page 1.npy is missing"):
    release.ReleaseLayout.read(tmp_path / "release")
