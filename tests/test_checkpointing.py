"""cpm_jax.checkpointing: params-only checkpoints, the training Checkpointer, restore onto other meshes."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.serialization import serialization as orbax_serialization

from cpm_jax import checkpointing, partitioning
from cpm_jax.models import cpm

TINY = cpm.CPMConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=8, max_positions=32)


def _shardings(config, mesh_config):
  mesh = partitioning.make_mesh(mesh_config)
  return partitioning.tree_shardings(cpm.logical_axes(config), mesh, cpm.abstract_params(config))


def _assert_bitwise_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def params():
  return cpm.init(TINY, jax.random.key(0))


def test_params_roundtrip_reads_each_shard_into_its_device(tmp_path, params, monkeypatch):
  metadata = {"model": {"vocab_size": 64, "num_layers": 2}, "tokenizer": "/vocab/chinese_vocab.model"}
  checkpointing.save_params(tmp_path / "export", params, metadata)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the temporary path was renamed

  reads = []
  read_shard = orbax_serialization._read_shard

  async def recording_read_shard(*args, **kwargs):
    shard = await read_shard(*args, **kwargs)
    reads.append(shard.shape)
    return shard

  monkeypatch.setattr(orbax_serialization, "_read_shard", recording_read_shard)
  shardings = _shardings(TINY, partitioning.MeshConfig(data=1, tensor=8))
  restored, restored_metadata = checkpointing.restore_params(tmp_path / "export", cpm.abstract_params(TINY),
                                                             shardings)
  assert restored_metadata == metadata
  _assert_bitwise_equal(restored, params)
  assert [x.sharding for x in jax.tree.leaves(restored)] == jax.tree.leaves(shardings)
  # The vocab-split embedding is read as 8 slices of 8 rows; it is never read whole.
  assert reads.count((8, 32)) == 8 and (64, 32) not in reads


def test_params_restore_without_abstract_tree(tmp_path, params):
  checkpointing.save_params(tmp_path / "export", params, {})
  restored, metadata = checkpointing.restore_params(tmp_path / "export")
  assert metadata == {}
  _assert_bitwise_equal(restored, params)


def test_params_shape_mismatch_names_path_and_both_shapes(tmp_path, params):
  checkpointing.save_params(tmp_path / "export", params, {})
  wider = cpm.CPMConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=8, max_positions=32, mlp_dim=64)
  with pytest.raises(ValueError, match=r"'blocks/mlp/in_bias' has shape \(2, 128\) in the checkpoint but "
                                       r"\(2, 64\) in the configured model"):
    checkpointing.restore_params(tmp_path / "export", cpm.abstract_params(wider))


def test_params_tree_mismatch_names_path(tmp_path, params):
  checkpointing.save_params(tmp_path / "export", params, {})
  abstract = cpm.abstract_params(TINY)
  abstract["ln_f"].pop("bias")
  with pytest.raises(ValueError, match=r"holds parameter 'ln_f/bias' \(shape \(32,\)\) that the configured"):
    checkpointing.restore_params(tmp_path / "export", abstract)
  abstract = cpm.abstract_params(TINY)
  abstract["head"] = jax.ShapeDtypeStruct((32, 3), np.float32)
  with pytest.raises(ValueError, match=r"'head' \(shape \(32, 3\) in the configured model\) is missing"):
    checkpointing.restore_params(tmp_path / "export", abstract)


def test_params_missing_directory_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"No params checkpoint at {tmp_path / 'nowhere'}"):
    checkpointing.restore_params(tmp_path / "nowhere")


def test_save_params_refuses_bad_metadata_and_existing_output(tmp_path, params):
  with pytest.raises(TypeError, match="metadata must be JSON-serialisable"):
    checkpointing.save_params(tmp_path / "export", params, {"config": TINY})
  assert not list(tmp_path.iterdir())
  checkpointing.save_params(tmp_path / "export", params, {})
  with pytest.raises(FileExistsError, match="already exists"):
    checkpointing.save_params(tmp_path / "export", params, {})


def test_interrupted_params_save_leaves_no_checkpoint(tmp_path, params, monkeypatch):
  def crash(self, *args, **kwargs):
    raise KeyboardInterrupt("killed while writing")

  with monkeypatch.context() as patch:
    patch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
      checkpointing.save_params(tmp_path / "export", params, {})
  assert not (tmp_path / "export").exists()
  with pytest.raises(FileNotFoundError):
    checkpointing.restore_params(tmp_path / "export")
  checkpointing.save_params(tmp_path / "export", params, {})  # a retry replaces the leftover
  _assert_bitwise_equal(checkpointing.restore_params(tmp_path / "export")[0], params)
