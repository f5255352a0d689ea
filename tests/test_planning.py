"""The planner (cpm_jax.planning): its memory figures against XLA's own for the real train step compiled ahead of
time on 8 CPU devices, its table and recommendation, and what it says of the released sizes."""

import dataclasses

import gin
import pytest

from cpm_jax import adapters, gin_setup, partitioning, planning, train_loop, training  # noqa: F401 (train's bindings)
from cpm_jax.models import cpm

OPTIMIZER = training.make_optimizer()
TINY = cpm.CPMConfig(vocab_size=512, num_layers=4, embed_dim=64, num_heads=4, max_positions=128, dropout_rate=0.0)
SMALL = cpm.CPMConfig(vocab_size=1024, num_layers=4, embed_dim=256, num_heads=4, max_positions=128, dropout_rate=0.0,
                      remat_policy="full")


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.mark.parametrize("name, model, layout", [
    ("tiny, data x fsdp x tensor", cpm.CPMLanguageModel(TINY), planning.Layout(data=2, fsdp=2, tensor=2)),
    ("small, remat, 4 stages", cpm.CPMLanguageModel(dataclasses.replace(SMALL, pipeline_microbatches=4)),
     planning.Layout(data=2, stage=4, pipeline_microbatches=4)),
    ("small LoRA, fsdp x tensor", adapters.AdaptedModel(cpm.CPMLanguageModel(SMALL), lora=adapters.LoraConfig(rank=4)),
     planning.Layout(fsdp=4, tensor=2)),
])
def test_planner_memory_agrees_with_the_compiled_step(name, model, layout):
  """Float32 models (XLA:CPU upcasts bfloat16 arithmetic, which a GPU or TPU does not, so its bf16 temporaries are
  not the accelerators')."""
  estimate = planning.estimate(model, OPTIMIZER, layout, planning.DEVICES["A100-80GB"], global_batch=8, seq_len=64)
  arguments, temporaries = planning.xla_memory(model, OPTIMIZER, layout, global_batch=8, seq_len=64)
  assert estimate.arguments == pytest.approx(arguments, rel=0.02), name  # the state's and batch's shards: exact
  assert estimate.total == pytest.approx(arguments + temporaries, rel=0.25), (name, estimate.temporary_total,
                                                                                temporaries)


def test_plan_table_recommends_a_layout_that_fits_with_the_bindings_that_select_it(clean_gin):
  model = cpm.CPMLanguageModel(dataclasses.replace(TINY, num_layers=8))
  table = planning.plan_table(model, "A100-80GB", 8, global_batch=16, seq_len=64, limit=None)
  lines = table.splitlines()
  assert lines[1].split()[:3] == ["layout", "params", "grads"] and "does NOT fit" not in table
  rows = lines[3:lines.index("")]
  assert len(rows) > 10 and " yes " in rows[0]
  assert any("stage=" in row and " M=" in row for row in rows)  # pipelines are among the candidates
  bindings = lines[lines.index("") + 2:]
  gin_setup.parse([], bindings)  # they are valid bindings of train.py's configurables ...
  sizes = partitioning.MeshConfig().resolve(8)  # ... and select the recommended layout
  described = " ".join(f"{axis}={size}" for axis, size in sizes.items() if size > 1)
  assert rows[0].startswith(described), (rows[0], bindings)
  with pytest.raises(ValueError, match="device 'V100' is none of"):
    planning.plan_table(model, "V100", 8, global_batch=16, seq_len=64)


def test_pipeline_layouts_count_the_bubble_and_split_the_layers():
  model = cpm.CPMLanguageModel(dataclasses.replace(TINY, num_layers=8))
  device = planning.DEVICES["A100-80GB"]
  plain = planning.estimate(model, OPTIMIZER, planning.Layout(data=8), device, global_batch=16, seq_len=64)
  piped = planning.estimate(model, OPTIMIZER, planning.Layout(data=2, stage=4, pipeline_microbatches=4), device,
                            global_batch=16, seq_len=64)
  assert piped.bubble == pytest.approx(3 / 7)
  assert piped.flops == pytest.approx(plain.flops * 7 / 4)  # the bubbles compute too
  assert piped.params < 0.5 * plain.params  # each stage holds a quarter of the blocks (the embedding in full)


def test_cpm_large_lora_fits_one_24gb_gpu_where_full_training_does_not(clean_gin):
  """The released cpm_large (its gin file): Adam on all 2.6B params needs ~48 GiB; LoRA on a bf16 base fits 24 GB
  (CPM-1-Finetune #14, #47)."""
  gin_setup.parse(["models/cpm_large.gin"], ["CPMConfig.remat_policy = 'full'", "CPMConfig.dropout_rate = 0.0"])
  config = cpm.CPMConfig()
  device = planning.DEVICES["GPU-24GB"]
  full = planning.plan(cpm.CPMLanguageModel(config), OPTIMIZER, device, 1, global_batch=8, seq_len=1024)[0]
  lora = adapters.AdaptedModel(cpm.CPMLanguageModel(dataclasses.replace(config, dtype="bfloat16")),
                               lora=adapters.LoraConfig(rank=8), base_dtype="bfloat16")
  tuned = planning.plan(lora, OPTIMIZER, device, 1, global_batch=8, seq_len=1024)[0]
  assert not full.fits and full.optimizer > 2 * full.params - 1e6  # Adam's two fp32 moments of every param
  assert tuned.fits and tuned.params == pytest.approx(full.params / 2, rel=0.01)  # the bf16 base
  assert tuned.optimizer < 0.01 * full.optimizer and tuned.gradients < 0.01 * full.gradients


def test_remat_policies_show_in_the_activation_memory():
  """Per remat policy (CPMConfig.remat_policy), what the backward pass keeps: full remat keeps the least, none the
  most; the FLOPs count the recomputed forward."""
  device, layout = planning.DEVICES["A100-80GB"], planning.Layout(data=8)
  by_policy = {policy: planning.estimate(cpm.CPMLanguageModel(dataclasses.replace(TINY, remat_policy=policy)),
                                         OPTIMIZER, layout, device, global_batch=16, seq_len=64)
               for policy in ("none", "dots", "full")}
  assert by_policy["full"].activations < by_policy["dots"].activations < by_policy["none"].activations
  assert by_policy["full"].flops == pytest.approx(by_policy["none"].flops * 4 / 3)
