"""cpm_jax.checkpointing: params-only checkpoints, the training Checkpointer, restore onto other meshes."""

import functools
import json
import os
import pathlib
import shutil
import signal
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.serialization import serialization as orbax_serialization

from cpm_jax import checkpointing, gin_setup, partitioning
from cpm_jax.data import processes
from cpm_jax.models import cpm

TINY = cpm.CPMConfig(vocab_size=64, num_layers=2, embed_dim=32, num_heads=8, max_positions=32)


def _shardings(config, mesh_config):
  mesh = partitioning.make_mesh(mesh_config)
  return partitioning.tree_shardings(cpm.logical_axes(config), mesh, cpm.abstract_params(config))


def _assert_bitwise_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def params():
  return jax.jit(cpm.init, static_argnums=0)(TINY, jax.random.key(0))


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
    patch.setattr(ocp.Checkpointer, "save", crash)
    with pytest.raises(KeyboardInterrupt):
      checkpointing.save_params(tmp_path / "export", params, {})
  assert not (tmp_path / "export").exists()
  with pytest.raises(FileNotFoundError):
    checkpointing.restore_params(tmp_path / "export")
  checkpointing.save_params(tmp_path / "export", params, {})  # a retry replaces the leftover
  _assert_bitwise_equal(checkpointing.restore_params(tmp_path / "export")[0], params)


# ---- Checkpointer ------------------------------------------------------------------------------

@flax.struct.dataclass
class State:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped_steps: jax.Array


class CountingIterator:
  """A stand-in for a Grain iterator: batches {"position": [n]}, get_state()/set_state() of a dict or of bytes."""

  def __init__(self, as_bytes: bool = False):
    self.position, self.as_bytes = 0, as_bytes

  def __next__(self):
    self.position += 1
    return {"position": np.array([self.position - 1])}

  def get_state(self):
    state = {"position": self.position}
    return json.dumps(state).encode() if self.as_bytes else state

  def set_state(self, state):
    self.position = (json.loads(state) if self.as_bytes else state)["position"]


def counting(shards=1, as_bytes=False, **process):
  """This process's ShardedIterator over `shards` CountingIterators (process_index / process_count: emulated)."""
  return processes.ShardedIterator(lambda index, count: CountingIterator(as_bytes), shards, **process)


OPTIMIZER = optax.adamw(1e-2)


@functools.partial(jax.jit, static_argnums=1)
def _make_state(params, step):
  grads = jax.tree.map(lambda p: p * 0.5 + 1.0, params)
  opt_state = OPTIMIZER.init(params)
  updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
  return State(step=jnp.int32(step), params=optax.apply_updates(params, updates), opt_state=opt_state,
               rng=jax.random.fold_in(jax.random.key(7), step), skipped_steps=jnp.int32(1))


def _state_shardings(abstract_state, param_shardings):
  replicated = jax.sharding.NamedSharding(jax.tree.leaves(param_shardings)[0].mesh, jax.sharding.PartitionSpec())
  opt_shardings = optax.tree_map_params(OPTIMIZER, lambda _, s: s, abstract_state.opt_state, param_shardings,
                                        transform_non_params=lambda _: replicated)
  return State(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated,
               skipped_steps=replicated)


def _placed_state(params, step, mesh_config):
  abstract = jax.eval_shape(lambda: _make_state(params, step))
  shardings = _state_shardings(abstract, _shardings(TINY, mesh_config))
  return jax.jit(lambda p: _make_state(p, step), out_shardings=shardings)(params), abstract, shardings


def test_resume_onto_other_meshes_is_exact_and_sharded(tmp_path, params):
  state, abstract, _ = _placed_state(params, 3, partitioning.MeshConfig(data=2, tensor=4))
  iterator = counting()
  for _ in range(12):
    next(iterator)
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=3, max_to_keep=2) as checkpointer:
    assert checkpointer.maybe_save(3, state, iterator)
  for mesh_config in (partitioning.MeshConfig(data=1, tensor=8), partitioning.MeshConfig(data=1, fsdp=8),
                      None):
    if mesh_config is None:  # one device
      shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
    else:
      shardings = _state_shardings(abstract, _shardings(TINY, mesh_config))
    resumed_iterator = counting()
    with checkpointing.Checkpointer(tmp_path, save_interval_steps=3, max_to_keep=2) as checkpointer:
      restored = checkpointer.restore(abstract, shardings, resumed_iterator)
    assert next(resumed_iterator)["position"].tolist() == [12]
    assert [x.sharding for x in jax.tree.leaves(restored)] == jax.tree.leaves(shardings)
    _assert_bitwise_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    _assert_bitwise_equal(restored.replace(rng=None), state.replace(rng=None))


def test_retention_interval_and_forced_saves(tmp_path, params):
  state = _make_state(params, 0)
  iterator = counting(as_bytes=True)
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2, keep_period=4) as checkpointer:
    saved = [step for step in range(1, 13) if checkpointer.maybe_save(step, state.replace(step=step), iterator)]
    assert saved == [2, 4, 6, 8, 10, 12]
    assert checkpointer.maybe_save(13, state, iterator, force=True)
    assert not checkpointer.maybe_save(13, state, iterator, force=True)  # never written twice
    checkpointer.wait()
    assert checkpointer.all_steps() == [4, 8, 12, 13]  # the last 2, plus every 4th step kept forever
  for _ in range(99):
    next(iterator)
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2, keep_period=4) as checkpointer:
    abstract = jax.eval_shape(lambda: state)
    restored = checkpointer.restore(abstract, None, iterator, step=8)
  assert int(restored.step) == 8 and next(iterator)["position"].tolist() == [0]


def test_relative_directories_are_taken_from_the_working_directory(tmp_path, params, monkeypatch):
  monkeypatch.chdir(tmp_path)  # as `--workdir=workdir/demo` is, from where the script runs
  checkpointing.save_params("exports/tiny", params, {"family": "cpm"})
  restored, _ = checkpointing.restore_params("exports/tiny")
  _assert_bitwise_equal(restored, params)
  state = _make_state(params, 0)
  with checkpointing.Checkpointer("workdir/checkpoints", save_interval_steps=1) as checkpointer:
    assert checkpointer.maybe_save(1, state)
  assert (tmp_path / "workdir/checkpoints/1").is_dir()
  _assert_bitwise_equal(checkpointing.restore_any_params("workdir"), state.params)


def test_restore_errors_name_what_is_wrong(tmp_path, params):
  state = _make_state(params, 0)
  abstract = jax.eval_shape(lambda: state)
  with checkpointing.Checkpointer(tmp_path / "empty") as checkpointer:
    assert checkpointer.latest_step() is None
    with pytest.raises(FileNotFoundError, match=f"No complete checkpoint in {tmp_path / 'empty'}"):
      checkpointer.restore(abstract, None)
  with checkpointing.Checkpointer(tmp_path / "run", save_interval_steps=1) as checkpointer:
    checkpointer.maybe_save(5, state)
    checkpointer.wait()
    with pytest.raises(FileNotFoundError, match=r"No checkpoint for step 4 .* complete checkpoints: \[5\]"):
      checkpointer.restore(abstract, None, step=4)
    with pytest.raises(FileNotFoundError, match="run/5 holds no data-iterator state"):
      checkpointer.restore(abstract, None, counting())
    checkpointer.maybe_save(6, state, counting(shards=2))
    checkpointer.wait()
    assert checkpointer.data_shard_count(6) == 2
    with pytest.raises(FileNotFoundError, match=r"No data-iterator state for shard 0 of 3 at .*/6/data; the "
                                                r"checkpoint holds \['shard_0-of-2.json', 'shard_1-of-2.json'\]"):
      checkpointer.restore(abstract, None, counting(shards=3))
    wider = cpm.CPMConfig(vocab_size=64, num_layers=3, embed_dim=32, num_heads=8, max_positions=32)
    other = jax.eval_shape(lambda: _make_state(cpm.init(wider, jax.random.key(0)), 0))
    with pytest.raises(ValueError, match=r"'params/blocks/attn/out_bias' has shape \(2, 32\) in the checkpoint "
                                         r"but \(3, 32\) in the configured model"):
      checkpointer.restore(other, None)


def test_incomplete_checkpoint_is_never_restored(tmp_path, params):
  state = _make_state(params, 0)
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=1) as checkpointer:
    checkpointer.maybe_save(1, state.replace(step=1))
  # What a save killed mid-write leaves: its temporary directory (never renamed to "2").
  shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-1234")
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=1) as checkpointer:
    assert checkpointer.latest_step() == 1
    assert int(checkpointer.restore(jax.eval_shape(lambda: state), None).step) == 1
    assert checkpointer.maybe_save(2, state.replace(step=2))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


# ---- warm starts ---------------------------------------------------------------------------------

def _fresh(config, mesh_config, seed):
  shardings = _shardings(config, mesh_config)
  return jax.jit(cpm.init, static_argnums=0, out_shardings=shardings)(config, jax.random.key(seed))


def test_warm_start_takes_what_it_selects_and_initialises_the_rest(tmp_path, params):
  state = _make_state(params, 0)
  with checkpointing.Checkpointer(tmp_path / "run" / "checkpoints", save_interval_steps=1) as checkpointer:
    checkpointer.maybe_save(3, state)
  checkpointing.save_params(tmp_path / "export", params, {})
  mesh_config = partitioning.MeshConfig(data=2, tensor=4)

  # From a workdir into a deeper model: what has the same path and shape is read, the blocks keep their init.
  deeper = cpm.CPMConfig(vocab_size=64, num_layers=3, embed_dim=32, num_heads=8, max_positions=32)
  fresh = _fresh(deeper, mesh_config, 1)
  start = checkpointing.warm_start(checkpointing.RestoreCheckpointConfig(path=str(tmp_path / "run"),
                                                                         fallback_to_init=True), fresh)
  assert start.restored == ["embed/wpe", "embed/wte", "ln_f/bias", "ln_f/scale"]
  assert len(start.initialised) == len(jax.tree.leaves(fresh)) - 4 and all(
      name.startswith("blocks/") for name in start.initialised)
  _assert_bitwise_equal(start.params["embed"], state.params["embed"])
  _assert_bitwise_equal(start.params["blocks"], fresh["blocks"])
  assert [x.sharding for x in jax.tree.leaves(start.params)] == [x.sharding for x in jax.tree.leaves(fresh)]
  with pytest.raises(ValueError, match=r"path = .*run.*: the model's param 'blocks/attn/out_bias' \(shape \(3, 32\)\) "
                                       r"is selected but the checkpoint holds it with shape \(2, 32\); "
                                       r".*fallback_to_init"):
    checkpointing.warm_start(checkpointing.RestoreCheckpointConfig(path=str(tmp_path / "run")), fresh)

  # From a params-only checkpoint: a path prefix and a regex select, an exclusion wins, restored arrays are cast.
  fresh = _fresh(TINY, mesh_config, 2)
  config = checkpointing.RestoreCheckpointConfig(path=str(tmp_path / "export"), include=("blocks/", r"embed/w[pt]e"),
                                                 exclude=("blocks/mlp/",), dtype="bfloat16")
  start = checkpointing.warm_start(config, fresh)
  assert sorted(start.initialised) == sorted(["blocks/mlp/in_bias", "blocks/mlp/in_kernel", "blocks/mlp/out_bias",
                                              "blocks/mlp/out_kernel", "ln_f/bias", "ln_f/scale"])
  got = start.params["blocks"]["attn"]["qkv_kernel"]
  assert got.dtype == jnp.bfloat16 and got.sharding == fresh["blocks"]["attn"]["qkv_kernel"].sharding
  np.testing.assert_array_equal(got, params["blocks"]["attn"]["qkv_kernel"].astype(jnp.bfloat16))
  _assert_bitwise_equal(start.params["blocks"]["mlp"], fresh["blocks"]["mlp"])
  with pytest.raises(ValueError, match="no param of the model is selected and held by the checkpoint"):
    checkpointing.warm_start(checkpointing.RestoreCheckpointConfig(path=str(tmp_path / "export"),
                                                                   include=("decoder/",)), fresh)
  with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
    checkpointing.warm_start(checkpointing.RestoreCheckpointConfig(path=str(tmp_path / "nowhere")), fresh)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="empty is neither a params-only checkpoint"):
    checkpointing.warm_start(checkpointing.RestoreCheckpointConfig(path=str(tmp_path / "empty")), fresh)


# ---- PreemptionGuard ---------------------------------------------------------------------------

def test_sigterm_sets_a_flag_and_a_second_one_is_harmless():
  before = signal.getsignal(signal.SIGTERM)
  with checkpointing.PreemptionGuard() as guard:
    assert not guard.requested and not guard.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested and guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested
  assert signal.getsignal(signal.SIGTERM) == before


# ---- integrity: checksums and damaged files ----------------------------------------------------

def test_checksums_do_not_depend_on_sharding_and_see_one_changed_element(params):
  from cpm_jax import checksums
  on_one_device = checksums.compute(params)
  sharded = jax.device_put(params, _shardings(TINY, partitioning.MeshConfig(data=2, fsdp=2, tensor=2)))
  assert checksums.compute(sharded) == on_one_device
  kernel = np.asarray(params["blocks"]["attn"]["qkv_kernel"]).copy()
  kernel.flat[kernel.size // 2] = np.nextafter(kernel.flat[kernel.size // 2], np.float32(1))  # one ulp, one element
  changed = jax.tree.map(lambda x: x, params)
  changed["blocks"]["attn"]["qkv_kernel"] = jnp.asarray(kernel)
  differing = [name for name, value in checksums.compute(changed).items() if value != on_one_device[name]]
  assert differing == ["blocks/attn/qkv_kernel"]
  swapped = jax.tree.map(lambda x: x, params)  # the same values in other positions
  swapped["embed"]["wte"] = params["embed"]["wte"][::-1]
  assert checksums.compute(swapped)["embed/wte"] != on_one_device["embed/wte"]


def _data_files(directory):
  """The files Orbax wrote the arrays' bytes to (OCDBT data files), largest first."""
  files = [p for p in pathlib.Path(directory).rglob("*") if p.is_file() and "/d/" in str(p)]
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def test_damaged_params_checkpoint_is_an_error_naming_the_array(tmp_path, params):
  directory = checkpointing.save_params(tmp_path / "export", params, {"model": "cpm"})
  checkpointing.restore_params(directory)  # intact: reads and verifies
  biggest = _data_files(directory / checkpointing.PARAMS_DIR)[0]
  data = bytearray(biggest.read_bytes())
  data[len(data) // 2: len(data) // 2 + 64] = np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()
  biggest.write_bytes(bytes(data))  # random bytes in the middle of the data: still a readable file
  with pytest.raises(checkpointing.CheckpointDamaged, match=r"^params checkpoint .*export: array '[\w/]+' does not "
                                                            r"hold what was saved \(checksum \w{8}, saved \w{8}\)"):
    checkpointing.restore_params(directory)
  params_again, _ = checkpointing.restore_params(directory, verify=False)  # the damage is real: values differ
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(params_again), jax.tree.leaves(params)))
  biggest.write_bytes(bytes(data[:len(data) // 3]))  # truncated
  with pytest.raises(checkpointing.CheckpointDamaged) as truncated:
    checkpointing.restore_params(directory)
  assert "\n" not in str(truncated.value) and "truncated or damaged" in str(truncated.value), str(truncated.value)


def test_damaged_training_checkpoint_is_an_error_naming_the_array(tmp_path, params):
  state = _make_state(params, 0)
  abstract = jax.eval_shape(lambda: state)
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=1) as checkpointer:
    checkpointer.maybe_save(1, state)
    checkpointer.wait()
    record = tmp_path / "1" / "checksums" / checkpointing.CHECKSUMS_FILE
    stored = json.loads(record.read_text())
    stored["arrays"]["params/embed/wte"] = "%08x" % (int(stored["arrays"]["params/embed/wte"], 16) ^ 1)
    record.write_text(json.dumps(stored))  # the same as damaging that array's bytes, without Orbax's layout
    with pytest.raises(checkpointing.CheckpointDamaged, match=r"checkpoint .*/1: array 'params/embed/wte' does not "
                                                              "hold what was saved"):
      checkpointer.restore(abstract, None)
    with pytest.raises(checkpointing.CheckpointDamaged, match="array 'params/embed/wte'"):
      checkpointer.stored_params(1).read(jax.eval_shape(lambda: params))
    unverified = checkpointing.Checkpointer(tmp_path, verify_checksums=False).restore(abstract, None)
    _assert_bitwise_equal(unverified.params, state.params)


def test_data_shards_resume_on_another_process_count(tmp_path, params):
  """A run's data shards restore on any process count dividing their number: here 2 shards saved by 1 process,
  restored as processes 0 and 1 of 2 (and the reverse is the same files: one per shard)."""
  state = _make_state(params, 0)
  abstract = jax.eval_shape(lambda: state)
  one_process = counting(shards=2)
  batches = [next(one_process)["position"].tolist() for _ in range(5)]
  assert batches == [[n, n] for n in range(5)]  # shard 0's rows, then shard 1's: the global batch
  next(one_process._iterators[1])  # the shards need not be at the same position
  with checkpointing.Checkpointer(tmp_path, save_interval_steps=1) as checkpointer:
    checkpointer.maybe_save(5, state, one_process)
    checkpointer.wait()
    assert sorted(p.name for p in (tmp_path / "5" / "data").glob("*.json")) == ["shard_0-of-2.json", "shard_1-of-2.json"]
    halves = [counting(shards=2, process_index=index, process_count=2) for index in (0, 1)]
    for half in halves:
      checkpointer.restore(abstract, None, half)
  assert [next(half)["position"].tolist() for half in halves] == [[5], [6]]
  assert next(one_process)["position"].tolist() == [5, 6]
  with pytest.raises(gin_setup.ConfigError, match=r"train.data_shards = 2: the data's shards must split evenly over "
                                                  r"the 4 processes"):
    counting(shards=2, process_index=0, process_count=4)
