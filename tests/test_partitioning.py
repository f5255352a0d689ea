"""Mesh construction, logical rules, and the invariant: same seed + data -> same training on every mesh."""

import math
import os
import subprocess
import sys
import textwrap

import gin
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cpm_jax import gin_setup, partitioning, train_loop, training  # noqa: F401  (train's gin bindings)
from cpm_jax.models import cpm, m6, plug

TINY = cpm.CPMConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=8, max_positions=64, dropout_rate=0.0)
M6_TINY = m6.M6Config(vocab_size=128, num_layers=2, embed_dim=32, num_heads=8, max_text_positions=32, image_size=8,
                      patch_size=4, dropout_rate=0.0)

MESHES = [
    dict(data=1, fsdp=1, tensor=1),
    dict(data=8, fsdp=1, tensor=1),
    dict(data=1, fsdp=8, tensor=1),
    dict(data=1, fsdp=1, tensor=8),
    dict(data=2, fsdp=2, tensor=2),
    dict(data=2, fsdp=1, tensor=4),
    dict(data=2, fsdp=1, tensor=2, extra_axes={"stage": 2}),  # a 2-stage pipeline (TINY's 2 layers, 1 per stage)
]


def test_mesh_config_resolves_minus_one_and_rejects_bad_sizes():
  assert partitioning.MeshConfig(data=-1, tensor=2).resolve(8) == {"data": 4, "fsdp": 1, "tensor": 2}
  with pytest.raises(ValueError, match="does not divide"):
    partitioning.MeshConfig(data=-1, tensor=3).resolve(8)
  with pytest.raises(ValueError, match="multiply to 4"):
    partitioning.MeshConfig(data=2, fsdp=2, tensor=1).resolve(8)
  with pytest.raises(ValueError, match="at most one axis"):
    partitioning.MeshConfig(data=-1, fsdp=-1).resolve(8)


def test_indivisible_parameter_names_path_and_axis():
  config = cpm.CPMConfig(vocab_size=100, num_layers=1, embed_dim=32, num_heads=8, max_positions=16)
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=1, tensor=8))
  with pytest.raises(ValueError, match=r"embed/wte: dimension 0 \(logical axis 'vocab'\).*'tensor' of size 8"):
    partitioning.tree_shardings(cpm.logical_axes(config), mesh, cpm.abstract_params(config))


def test_megatron_layout_rules():
  rules = partitioning.DEFAULT_RULES
  assert partitioning.logical_to_spec(("embed", "qkv", "heads", "kv"), rules) == jax.sharding.PartitionSpec(
      "fsdp", None, "tensor", None)
  assert partitioning.logical_to_spec(("mlp", "embed"), rules) == jax.sharding.PartitionSpec("tensor", "fsdp")
  assert partitioning.logical_to_spec(("batch", "length"), rules) == jax.sharding.PartitionSpec(
      ("data", "fsdp", "stage"), None)
  # On a mesh without pipeline stages, `stage` drops out of every rule.
  plain = partitioning.MESH_AXES
  assert partitioning.logical_to_spec(("batch", "length"), rules, plain) == jax.sharding.PartitionSpec(
      ("data", "fsdp"), None)
  assert partitioning.logical_to_spec(("layers", "embed"), rules, plain) == jax.sharding.PartitionSpec(None, "fsdp")
  # A merged [batch * heads] dimension (the decode cache) takes batch's mesh axes, then the heads'.
  assert partitioning.logical_to_spec(("batch*act_heads", None, "cache_length"), rules, plain) == \
      jax.sharding.PartitionSpec(("data", "fsdp", "tensor"), None, None)
  with pytest.raises(KeyError, match="'nonsense' has no rule"):
    partitioning.logical_to_spec(("batch*nonsense",), rules)


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_rules_from_gin_extend_or_replace_the_table(clean_gin):
  gin_setup.parse([], ['logical_axis_rules.extra_rules = [("act_.*", None), ("vocab", ["tensor", "fsdp"])]'])
  assert partitioning.logical_to_spec(("batch", "length", "act_heads")) == P(("data", "fsdp", "stage"), None, None)
  assert partitioning.logical_to_spec(("vocab", "embed")) == P(("tensor", "fsdp"), None)  # fsdp taken by vocab
  assert partitioning.logical_to_spec(("mlp", "embed")) == P("tensor", "fsdp")  # the rest of the table as before
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=2, tensor=4))
  shardings = partitioning.tree_shardings(cpm.logical_axes(TINY), mesh, cpm.abstract_params(TINY))
  assert shardings["embed"]["wte"].shard_shape((128, 32)) == (16, 32)  # vocab over tensor x fsdp
  gin.clear_config()
  gin_setup.parse([], ['logical_axis_rules.rules = [(".*", None)]'])  # replaced: everything replicated
  assert partitioning.logical_to_spec(("vocab", "embed")) == P(None, None)
  gin.clear_config()
  gin_setup.parse([], ['logical_axis_rules.rules = [("batch", "data")]'])
  with pytest.raises(KeyError, match="Logical axis 'embed' has no rule; known axes: \\['batch'\\]"):
    partitioning.logical_to_spec(("batch", "embed"))


def _ids(mesh):
  return np.vectorize(lambda device: device.id)(mesh.devices)


def test_extra_axes_and_their_order():
  config = partitioning.MeshConfig(data=2, fsdp=2, tensor=1, extra_axes={"stage": 2})
  mesh = partitioning.make_mesh(config)
  assert mesh.axis_names == ("data", "stage", "fsdp", "tensor") and mesh.devices.shape == (2, 2, 2, 1)
  rules = (("layers", "stage"), *partitioning.DEFAULT_RULES)  # pipeline stages hold their layers
  shardings = partitioning.tree_shardings(cpm.logical_axes(TINY), mesh, cpm.abstract_params(TINY), rules)
  assert shardings["blocks"]["attn"]["qkv_kernel"].shard_shape((2, 32, 3, 8, 4)) == (1, 16, 3, 8, 4)
  ordered = partitioning.make_mesh(partitioning.MeshConfig(data=-1, extra_axes={"expert": 4},
                                                           axis_order=("expert", "data", "fsdp", "tensor")))
  assert ordered.axis_names == ("expert", "data", "fsdp", "tensor") and ordered.devices.shape == (4, 2, 1, 1)
  with pytest.raises(ValueError, match="axis_order=\\['data', 'fsdp'\\] must name each of"):
    partitioning.make_mesh(partitioning.MeshConfig(axis_order=("data", "fsdp")))


def test_dcn_split_keeps_each_slice_together():
  # One process without slices (8 CPU devices): ids 0-3 are slice 0 and 4-7 slice 1 (MeshConfig.dcn).
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2, dcn={"data": 2}))
  ids = _ids(mesh)
  assert sorted(ids[0].ravel()) == [0, 1, 2, 3] and sorted(ids[1].ravel()) == [4, 5, 6, 7]
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=4, tensor=2, dcn={"fsdp": 2}))
  ids = _ids(mesh)[0]  # [fsdp, tensor]: fsdp's first half in slice 0, its second half in slice 1
  assert sorted(ids[:2].ravel()) == [0, 1, 2, 3] and sorted(ids[2:].ravel()) == [4, 5, 6, 7]
  assert all(ids[i, 0] // 4 == ids[i, 1] // 4 for i in range(4))  # tensor parallelism never crosses slices
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1, tensor=2, dcn={"data": 4}))  # -1 resolved first
  assert mesh.devices.shape == (4, 1, 2)
  assert [sorted(row.ravel() // 2) for row in _ids(mesh)] == [[i, i] for i in range(4)]
  with pytest.raises(ValueError, match=r"MeshConfig.dcn\['tensor'\]=3 must be positive and divide the axis size 2"):
    partitioning.make_mesh(partitioning.MeshConfig(data=-1, tensor=2, dcn={"tensor": 3}))
  with pytest.raises(ValueError, match=r"MeshConfig.dcn names \['stage'\], which are not mesh axes"):
    partitioning.make_mesh(partitioning.MeshConfig(dcn={"stage": 2}))


@pytest.mark.parametrize("gin_files,model_of,params", [
    (["models/cpm_large.gin", "experiments/cpm_release_recipe.gin"], lambda: cpm.CPMLanguageModel(cpm.CPMConfig()),
     2.5e9),
    (["experiments/plug_27b_question_generation.gin"], lambda: plug.Seq2SeqModel(plug.PlugConfig()), 25e9),
], ids=["cpm_large_release", "plug_27b_question_generation"])
def test_big_recipes_name_a_mesh_that_splits_params_and_adam_over_the_devices(gin_files, model_of, params,
                                                                              clean_gin):
  gin_setup.parse(gin_files, [])
  assert gin.query_parameter("train.mesh_config").configurable.name == "MeshConfig"
  model, mesh = model_of(), partitioning.make_mesh(partitioning.MeshConfig())
  abstract, shardings = training.state_shardings(model, training.make_optimizer(), mesh)
  leaves = zip(jax.tree.leaves((abstract.params, abstract.opt_state)), jax.tree.leaves((shardings.params,
                                                                                        shardings.opt_state)))
  total = per_device = 0
  for leaf, sharding in leaves:
    total += math.prod(leaf.shape) * leaf.dtype.itemsize
    per_device += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
  # 8 devices: every large weight and its Adam moments are split 8 ways (data=-1 would hold them all on each).
  assert total > 12 * params and per_device < 1.05 * total / 8, (total, per_device)  # float32 params, mu, nu


def _batch(seed, batch=8, length=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(8, TINY.vocab_size, (batch, length + 1)).astype(np.int32)
  return {
      "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
      "weights": np.ones((batch, length), np.float32),
      "segment_ids": np.ones((batch, length), np.int32),
      "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
  }


def _m6_batch(seed, batch=8, length=12):
  """A mixed M6 batch: image-to-text, image+text-to-text, text prefix LM and causal LM rows, some padded."""
  rng = np.random.default_rng(seed)
  lm = _batch(seed, batch, length)
  lm["segment_ids"][::3, -3:] = 0
  lm["weights"] = lm["segment_ids"].astype(np.float32)
  return {**lm, "images": rng.normal(size=(batch, 8, 8, 3)).astype(np.float32),
          "has_image": np.array([1, 1, 0, 0] * (batch // 4), np.int32),
          "prefix_lengths": np.array([2, 5, 4, 0] * (batch // 4), np.int32)}


# family -> (model, batch, meshes); M6 on one device, on the mesh that splits all three axes at once and on a 2-stage
# pipeline (its train step compiles slower than CPM's: each mesh costs ~2x CPM's on 2 cores).
MODELS = {"cpm": (cpm.CPMLanguageModel(TINY), _batch, MESHES),
          "m6": (m6.M6Model(M6_TINY), _m6_batch, [MESHES[0], MESHES[4], MESHES[6]])}


def _train_three_steps(mesh_sizes, family="cpm"):
  config = partitioning.MeshConfig(**mesh_sizes)
  devices = math.prod([config.data, config.fsdp, config.tensor, *config.extra_axes.values()])
  mesh = partitioning.make_mesh(config, devices=jax.devices()[:devices])
  model, make_batch, _ = MODELS[family]
  optimizer = training.make_optimizer(training.learning_rate_schedule(1e-2, 1, 10))
  steps = training.make_sharded_steps(model, optimizer, mesh)
  state = training.create_train_state(model, optimizer, mesh, seed=0)
  losses = []
  for _ in range(3):
    state, metrics = steps.train(state, training.global_batch(make_batch(0), mesh))
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, state.params), state


@pytest.mark.parametrize("family", sorted(MODELS))
def test_same_training_on_every_mesh(family):
  meshes = MODELS[family][2]
  reference_losses, reference_params, _ = _train_three_steps(meshes[0], family)
  assert reference_losses[2] < reference_losses[0]
  for sizes in meshes[1:]:
    losses, params, _ = _train_three_steps(sizes, family)
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5, err_msg=str(sizes))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(reference_params)):
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"{sizes} {jax.tree_util.keystr(path)}")


def test_tensor_sharded_weight_is_really_split():
  _, _, state = _train_three_steps(dict(data=2, fsdp=1, tensor=4))
  qkv = state.params["blocks"]["attn"]["qkv_kernel"]  # [L, E, 3, H, D], heads on tensor
  shard_shapes = {shard.data.shape for shard in qkv.addressable_shards}
  assert shard_shapes == {(2, 32, 3, 2, 4)}
  wte = state.params["embed"]["wte"]  # vocab split 4 ways
  assert {shard.data.shape for shard in wte.addressable_shards} == {(32, 32)}
  moment = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
  mu_qkv = [m.mu["blocks"]["attn"]["qkv_kernel"] for m in moment if hasattr(m, "mu")][0]
  assert {shard.data.shape for shard in mu_qkv.addressable_shards} == {(2, 32, 3, 2, 4)}


def test_train_steps_compile_without_replicating_a_tensor_on_every_device():
  """XLA logs "Involuntary full rematerialization" (at a log level tests silence, hence a child process) when a
  sharding has no efficient partitioning and it replicates the tensor on every device instead: the embedding
  gathers did on meshes that split both the batch and the embed columns (transformer.gather_rows)."""
  child = textwrap.dedent("""
      import jax
      from cpm_jax import partitioning, training
      from cpm_jax.models import cpm, m6, plug
      models = [cpm.CPMLanguageModel(cpm.CPMConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=8,
                                                   max_positions=16)),
                m6.M6Model(m6.M6Config(vocab_size=128, num_layers=2, embed_dim=32, num_heads=8,
                                       max_text_positions=16, image_size=8, patch_size=4)),
                plug.Seq2SeqModel(plug.PlugConfig(vocab_size=128, num_encoder_layers=1, num_decoder_layers=1,
                                                  embed_dim=32, num_heads=8, mlp_dim=64, max_positions=16,
                                                  type_vocab_size=2))]
      mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, tensor=2))
      for model in models:
        steps = training.make_sharded_steps(model, training.make_optimizer(), mesh)
        steps.train.lower(steps.abstract_state, model.example_batch(8, 16, 8)).compile()
        print("compiled", type(model).__name__)
  """)
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "1"}  # warnings on
  result = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count("compiled") == 3, result.stdout
  replicated = [line for line in result.stderr.splitlines() if "Involuntary full rematerialization" in line]
  assert not replicated, replicated[0][:600]

