"""Pipeline parallelism on a `stage` mesh axis: the same loss and gradients as without stages, bubbles that never
leak (NaN-poisoned, as Praxis tests), checkpoints that move between meshes with and without stages."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from cpm_jax import checkpointing, layers, partitioning, pipeline_parallel, training
from cpm_jax.models import cpm, plug

AXES = ("data", "stage", "fsdp", "tensor")
CPM = cpm.CPMConfig(vocab_size=128, num_layers=4, embed_dim=32, num_heads=4, max_positions=64, dropout_rate=0.0)
PLUG = plug.PlugConfig(vocab_size=128, num_encoder_layers=2, num_decoder_layers=2, embed_dim=32, num_heads=4,
                       mlp_dim=64, max_positions=64, num_relations=0, dropout_rate=0.0)


def stage_mesh(data=1, stage=1, fsdp=1, tensor=1) -> Mesh:
  return Mesh(np.asarray(jax.devices()[:data * stage * fsdp * tensor]).reshape(data, stage, fsdp, tensor), AXES)


def _lm_batch(batch=8, length=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, CPM.vocab_size, (batch, length + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "weights": (rng.random((batch, length)) > 0.2).astype(np.float32)}


def _seq2seq_batch(batch=8, length=12, decoder_length=10, seed=0):
  rng = np.random.default_rng(seed)
  ints = lambda *shape: rng.integers(5, PLUG.vocab_size, shape).astype(np.int32)  # noqa: E731
  return {"inputs": ints(batch, length), "targets": ints(batch, length),
          "weights": (rng.random((batch, length)) < 0.3).astype(np.float32),
          "decoder_inputs": ints(batch, decoder_length), "decoder_targets": ints(batch, decoder_length),
          "decoder_weights": np.ones((batch, decoder_length), np.float32)}


def _loss_and_grads(model, params, batch, mesh=None, poisoned=False):
  """Loss sum and its gradients, jitted on `mesh` (params placed by the rules) or on one device."""
  def loss(params, batch):
    with partitioning.on_mesh(mesh):
      if not poisoned:
        return jax.value_and_grad(lambda p: model.loss(p, batch)[1]["loss_sum"])(params)
      with pipeline_parallel.poisoned_bubbles():
        return jax.value_and_grad(lambda p: model.loss(p, batch)[1]["loss_sum"])(params)

  if mesh is not None:
    axes = layers.logical_axes(model.param_specs())
    params = jax.device_put(params, partitioning.tree_shardings(axes, mesh, params))
  return jax.tree.map(np.asarray, jax.jit(loss)(params, batch))


def _assert_same(got, want, label):
  (loss, grads), (want_loss, want_grads) = got, want
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, err_msg=label)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(want_grads)):
    assert np.isfinite(g).all(), f"{label} {jax.tree_util.keystr(path)}: a bubble leaked into the gradients"
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-4, err_msg=f"{label} {jax.tree_util.keystr(path)}")


@pytest.fixture(scope="module")
def cpm_reference():
  params = cpm.init(CPM, jax.random.key(0))
  return params, _loss_and_grads(cpm.CPMLanguageModel(CPM), params, _lm_batch())


@pytest.mark.parametrize("mesh_sizes, microbatches, repeats", [
    (dict(data=2, stage=4), 4, 1),                 # GPipe over 4 stages, data parallel on the rest
    (dict(stage=2, fsdp=2, tensor=2), 2, 2),       # circular: each stage holds layers {0, 2} or {1, 3}
])
def test_cpm_pipeline_equals_no_pipeline_with_poisoned_bubbles(cpm_reference, mesh_sizes, microbatches, repeats):
  params, reference = cpm_reference
  config = dataclasses.replace(CPM, pipeline_microbatches=microbatches, pipeline_repeats=repeats)
  got = _loss_and_grads(cpm.CPMLanguageModel(config), params, _lm_batch(), stage_mesh(**mesh_sizes), poisoned=True)
  _assert_same(got, reference, str(mesh_sizes))


def test_plug_encoder_and_decoder_pipelines_equal_no_pipeline():
  params = plug.init(PLUG, jax.random.key(0))
  reference = _loss_and_grads(plug.Seq2SeqModel(PLUG), params, _seq2seq_batch())
  config = dataclasses.replace(PLUG, pipeline_microbatches=2)
  got = _loss_and_grads(plug.Seq2SeqModel(config), params, _seq2seq_batch(), stage_mesh(data=2, stage=2, tensor=2),
                        poisoned=True)
  _assert_same(got, reference, "PLUG data=2 stage=2 tensor=2")


def test_schedule_counts_iterations_and_bubble():
  gpipe = pipeline_parallel.Schedule(stages=4, microbatches=8)
  assert gpipe.iterations == 11 and gpipe.bubble_fraction == pytest.approx(3 / 11)
  circular = pipeline_parallel.Schedule(stages=4, microbatches=8, repeats=2)
  assert circular.iterations == 19 and circular.bubble_fraction == pytest.approx(3 / 19)
  assert "bubble 15.8%" in circular.describe()
  assert circular.layers_per_chunk(32, "blocks") == 4
  with pytest.raises(ValueError, match="blocks: 30 layers do not split into 4 stages x 2 repeats"):
    circular.layers_per_chunk(30, "blocks")
  with pytest.raises(ValueError, match="needs pipeline_microbatches >= the 4 stages"):
    pipeline_parallel.Schedule(stages=4, microbatches=2, repeats=2)


def test_checkpoints_move_between_meshes_with_and_without_stages(tmp_path):
  """Blocks are stored in layer order whatever the mesh: a train state saved from a stage mesh restores onto a mesh
  without a stage axis (and the reverse) holding the same values, each leaf split as the target mesh's rules say."""
  model = cpm.CPMLanguageModel(CPM)
  optimizer = training.make_optimizer()
  meshes = {"stages": stage_mesh(data=2, stage=4),
            "plain": partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))}
  rng = np.random.default_rng(0)
  for source, target in (("stages", "plain"), ("plain", "stages")):
    abstract, shardings = training.state_shardings(model, optimizer, meshes[source])
    state = jax.tree.map(lambda a, sharding: jax.device_put(rng.standard_normal(a.shape).astype(a.dtype), sharding),
                         abstract, shardings)
    with checkpointing.Checkpointer(str(tmp_path / source)) as checkpointer:
      checkpointer.maybe_save(1, state, None, force=True)
      checkpointer.wait()
      abstract, shardings = training.state_shardings(model, optimizer, meshes[target])
      restored = checkpointer.restore(abstract, shardings, None)
    for got, want, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(state), jax.tree.leaves(shardings)):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
      assert got.sharding == sharding
    qkv = restored.params["blocks"]["attn"]["qkv_kernel"]
    assert qkv.sharding.spec[0] == ("stage" if target == "stages" else None)
    assert {shard.data.shape[0] for shard in qkv.addressable_shards} == {1 if target == "stages" else 4}
