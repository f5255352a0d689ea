"""PLUG training: mesh invariance, the two-stage recipe through the train loop, fine-tuning, generation, and a PALM
stage stopped and resumed through the loop, bitwise as the uninterrupted run."""

import dataclasses
import json
import logging

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _data_helpers import demo_data_dir  # noqa: F401  (session fixture)
from _train_run import compilation_cache  # noqa: F401  (fixture)
from cpm_jax import checkpointing, decoding, gin_setup, partitioning, train_loop, training
from cpm_jax.data import corpus
from cpm_jax.models.plug import data as plug_pipeline
from cpm_jax.models import plug

TINY = plug.PlugConfig(vocab_size=256, num_encoder_layers=2, num_decoder_layers=2, embed_dim=32, num_heads=8,
                       mlp_dim=64, max_positions=32, type_vocab_size=2, init_stddev=0.02)
MESHES = [dict(data=1, fsdp=1, tensor=1), dict(data=1, fsdp=1, tensor=8), dict(data=2, fsdp=2, tensor=2)]


def _palm_batch(seed, batch=8, src=16, tgt=8):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(6, src + 1, batch)
  seg = (np.arange(src)[None] < lengths[:, None]).astype(np.int32)
  inputs = rng.integers(5, 256, (batch, src)).astype(np.int32) * seg
  mlm = (rng.random((batch, src)) < 0.2) & (seg > 0)
  dec = rng.integers(5, 256, (batch, tgt + 1)).astype(np.int32)
  return {"inputs": np.where(mlm, 3, inputs), "token_types": np.zeros_like(inputs), "segment_ids": seg,
          "positions": np.broadcast_to(np.arange(src, dtype=np.int32), (batch, src)).copy(),
          "targets": inputs * mlm, "weights": mlm.astype(np.float32),
          "decoder_inputs": dec[:, :-1], "decoder_targets": dec[:, 1:], "decoder_weights": np.ones((batch, tgt), np.float32),
          "decoder_segment_ids": np.ones((batch, tgt), np.int32),
          "decoder_positions": np.broadcast_to(np.arange(tgt, dtype=np.int32), (batch, tgt)).copy()}


def _train(model, mesh, steps_count, batches, params=None, lr=1e-2):
  optimizer = training.make_optimizer(training.learning_rate_schedule(lr, 1, 100))
  steps = training.make_sharded_steps(model, optimizer, mesh)
  state = training.create_train_state(model, optimizer, mesh, seed=0)
  if params is not None:
    state = state.replace(params=params)
  losses = []
  for i in range(steps_count):
    state, metrics = steps.train(state, training.global_batch(batches(i), mesh))
    losses.append(float(metrics["loss"]))
  return state, losses


def test_same_palm_training_on_every_mesh():
  model = plug.Seq2SeqModel(TINY)
  results = []
  for sizes in MESHES:
    mesh = partitioning.make_mesh(partitioning.MeshConfig(**sizes), devices=jax.devices()[:np.prod(list(sizes.values()))])
    state, losses = _train(model, mesh, 3, lambda i: _palm_batch(0))
    results.append((losses, jax.tree.map(np.asarray, state.params)))
  (reference_losses, reference), others = results[0], results[1:]
  assert reference_losses[2] < reference_losses[0]
  for sizes, (losses, params) in zip(MESHES[1:], others):
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5, err_msg=str(sizes))
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(reference)):
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=f"{sizes} {jax.tree_util.keystr(path)}")


def _run_recipe(gin_file, workdir, bindings, steps):
  """The train loop on a recipe, shortened; returns (final metrics, the model config it used)."""
  gin.clear_config()
  gin_setup.parse([gin_file], bindings + [
      f"train.num_steps = {steps}", f"train.eval_every = {steps}", f"train.log_every = {steps}",
      f"learning_rate_schedule.total_steps = {steps}", "learning_rate_schedule.warmup_steps = 5",
      "learning_rate_schedule.peak = 1e-2", "train.eval_max_batches = 2", "train.peak_flops = 1e12",
      "PlugConfig.dropout_rate = 0.0"])
  try:
    return train_loop.train(str(workdir)), plug.PlugConfig()
  finally:
    gin.clear_config()


def _initial_loss(model, params, batch):
  sums = training.eval_step(params, batch, model=model)
  return float(sums["loss_sum"] / sums["weight_sum"])


def test_two_stages_and_fine_tuning_on_demo_data(plug_vocab_path, demo_data_dir, tmp_path, caplog):  # noqa: F811
  data = [f'{name}.vocab_path = "{plug_vocab_path}"' for name in ("StructBertData", "PalmData")] + [
      f'{name}.data_dir = "{demo_data_dir}"' for name in ("StructBertData", "PalmData")] + [
      "StructBertData.seq_len = 64", "StructBertData.eval_max_examples = 64", "PalmData.seq_len = 64",
      "PalmData.target_len = 16", "PalmData.eval_max_examples = 64"]
  # Stage 1: StructBERT through the train loop and the recipe's gin file.
  stage1, config1 = _run_recipe("experiments/plug_stage1_demo.gin", tmp_path / "stage1", data, 40)
  eval1 = plug_pipeline.StructBertData(vocab_path=str(plug_vocab_path), data_dir=str(demo_data_dir), seq_len=64,
                                       eval_max_examples=64)
  fresh_loss = _initial_loss(plug.StructBertModel(config1), plug.init(config1, jax.random.key(0)),
                             next(eval1.eval_batches()))
  assert stage1["validation_loss"] < fresh_loss - 1.5, (stage1, fresh_loss)

  # Stage 2: PALM warm-started by its recipe (restore/warm_start.gin) from the stage-1 workdir: everything of
  # stage 1 (same path and shape), the decoder fresh. The start the train loop makes is the one warm_start makes.
  config2 = dataclasses.replace(config1, num_decoder_layers=2)
  stage1_params = checkpointing.restore_any_params(tmp_path / "stage1")
  fresh = plug.init(config2, jax.random.key(0))
  warm = checkpointing.warm_start(checkpointing.RestoreCheckpointConfig(path=str(tmp_path / "stage1"),
                                                                        fallback_to_init=True), fresh)
  assert warm.restored == sorted(warm.restored) and len(warm.restored) == len(jax.tree.leaves(stage1_params))
  assert warm.initialised and all(name.startswith("decoder/") for name in warm.initialised)
  jax.tree.map(np.testing.assert_array_equal, warm.params["encoder"], stage1_params["encoder"])
  jax.tree.map(np.testing.assert_array_equal, warm.params["decoder"], fresh["decoder"])
  eval2 = plug_pipeline.PalmData(vocab_path=str(plug_vocab_path), data_dir=str(demo_data_dir), seq_len=64,
                                 target_len=16, eval_max_examples=64)
  start_loss = _initial_loss(plug.Seq2SeqModel(config2), warm.params, next(eval2.eval_batches()))
  with caplog.at_level(logging.INFO):
    stage2, _ = _run_recipe("experiments/plug_stage2_demo.gin", tmp_path / "stage2",
                            data + [f'RestoreCheckpointConfig.path = "{tmp_path / "stage1"}"'], 30)
  assert f"Warm start from {tmp_path / 'stage1'}: {len(warm.restored)} params restored, {len(warm.initialised)} " \
      "initialised (decoder/" in caplog.text
  assert stage2["validation_loss"] < start_loss - 1.0, (stage2, start_loss)

  # NLU: a classifier warm-started from the stage-1 encoder fits a batch of review_sentiment (accuracy: benchmarks/).
  config3 = dataclasses.replace(config1, num_classes=2)
  model3 = plug.ClassifierModel(config3)
  reviews = plug_pipeline.ClassificationData(vocab_path=str(plug_vocab_path), data_dir=str(demo_data_dir),
                                             seq_len=64, global_batch_size=16)
  batch = next(reviews.train_iterator(seed=0))
  mesh = partitioning.make_mesh(partitioning.MeshConfig(data=-1))
  start = training.create_train_state(model3, training.make_optimizer(), mesh, seed=2).params
  warm3 = checkpointing.warm_start(checkpointing.RestoreCheckpointConfig(path=str(tmp_path / "stage1"),
                                                                         fallback_to_init=True), start)
  assert len(warm3.restored) == len(jax.tree.leaves(stage1_params)) and warm3.initialised == ["classifier/bias",
                                                                                               "classifier/kernel"]
  _, losses = _train(model3, mesh, 20, lambda i: batch, warm3.params, lr=5e-3)
  assert losses[-1] < 0.5 * losses[0], losses


def test_generation_cached_greedy_equals_recompute_and_sep_suppression():
  config = dataclasses.replace(TINY, dropout_rate=0.0)
  params = plug.init(config, jax.random.key(0))
  sources = [[2, 17, 30, 41, 9, 1], [2, 5, 6, 1]]
  cls_id, sep_id = 2, 1
  greedy = decoding.SamplingConfig(max_new_tokens=6, greedy=True)
  decode_params = plug.decode_layout(params)
  out = plug.generate(decode_params, sources, config, greedy, cls_id=cls_id, sep_id=sep_id)
  for source, got in zip(sources, out):  # uncached: the whole prefix through encoder and decoder every step
    hidden = plug.encode(params, jnp.asarray([source]), config)
    prefix = [cls_id]
    for _ in range(6):
      logits = plug.decoder_logits(params, plug.decode(params, jnp.asarray([prefix]), config, encoder_hidden=hidden),
                                   config)
      prefix.append(int(jnp.argmax(logits[0, -1])))
      if prefix[-1] == sep_id:
        break
    assert got == [t for t in prefix[1:] if t != sep_id]
  beam1 = decoding.BeamSearchConfig(max_new_tokens=6, beam_size=1, length_penalty=0.0, min_length=0)
  assert plug.generate(decode_params, sources, config, beam1, cls_id=cls_id, sep_id=sep_id) == out

  # A model that prefers [SEP] everywhere: sampling holds it back until 80% of the length, beam search until
  # min_length.
  biased = jax.tree.map(lambda x: x, params)  # decoder output fixed at ones; [SEP]'s logit 320, others ~0
  biased["decoder"]["ln_f"] = {"scale": jnp.zeros(32), "bias": jnp.ones(32)}
  biased["embed"]["wte"] = params["embed"]["wte"].at[sep_id].set(10.0)
  biased = plug.decode_layout(biased)
  sampled = plug.generate(biased, sources, config, decoding.SamplingConfig(max_new_tokens=10, top_k=20,
                                                                           temperature=0.9), cls_id=cls_id,
                          sep_id=sep_id)
  assert [len(s) for s in sampled] == [8, 8]
  beams = plug.generate(biased, sources, config, decoding.BeamSearchConfig(max_new_tokens=10, beam_size=3,
                                                                          min_length=4), cls_id=cls_id, sep_id=sep_id)
  assert [len(s) for s in beams] == [4, 4]
  with pytest.raises(ValueError, match="max_positions=32"):
    plug.generate(decode_params, [[1] * 40], config, greedy, cls_id=cls_id, sep_id=sep_id)


def test_stage1_recipe_parses(plug_vocab_path):
  gin.clear_config()
  try:
    gin_setup.parse(["experiments/plug_stage1_demo.gin"], [f'StructBertData.vocab_path = "{plug_vocab_path}"'])
    assert plug.PlugConfig().num_decoder_layers == 0
    assert json.dumps(dataclasses.asdict(plug.PlugConfig()))
  finally:
    gin.clear_config()


def _palm_stage(workdir, vocab_path, data_dir, steps, monkeypatch):
  """PLUG stage 2 (PALM, dropout on) from scratch through the train loop and its recipe, for `steps` of a 4-step
  schedule (the same run, stopped early when steps < 4); returns {step: loss} of the steps it trained."""
  losses = {}
  log_train = train_loop.MetricsLog.train

  def record(self, step, metrics, tokens_per_step):
    losses[step] = metrics["loss"]
    log_train(self, step, metrics, tokens_per_step)

  monkeypatch.setattr(train_loop.MetricsLog, "train", record)
  gin.clear_config()
  gin_setup.parse(["experiments/plug_stage2_demo.gin"], [
      "train.init_from = None", f'PalmData.vocab_path = "{vocab_path}"', f'PalmData.data_dir = "{data_dir}"',
      "PalmData.seq_len = 32", "PalmData.target_len = 8", "PalmData.global_batch_size = 8",
      "PalmData.eval_max_examples = 8", f"train.num_steps = {steps}", "train.log_every = 1", "train.eval_every = 1000",
      "train.eval_max_batches = 1", "train.peak_flops = 1e12", "learning_rate_schedule.total_steps = 4",
      "learning_rate_schedule.warmup_steps = 1", "learning_rate_schedule.peak = 1e-2",
      "Checkpointer.save_interval_steps = 1000", "PlugConfig.dropout_rate = 0.1"])
  try:
    train_loop.train(str(workdir))
  finally:
    gin.clear_config()
  return losses


@pytest.mark.usefixtures("compilation_cache")  # the three runs compile the same steps once
def test_palm_stage_stopped_and_resumed_is_bitwise_the_uninterrupted_run(demo_data_dir, tmp_path,  # noqa: F811
                                                                         monkeypatch):
  # A BERT vocab of the corpus's first characters (a small MLM head and embedding keep the steps cheap).
  characters = sorted(set("".join(corpus.peoples_daily_paragraphs()[:300])))
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("".join(f"{token}\n" for token in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *characters]))
  uninterrupted = _palm_stage(tmp_path / "a", vocab, demo_data_dir, 4, monkeypatch)
  first = _palm_stage(tmp_path / "b", vocab, demo_data_dir, 2, monkeypatch)
  assert checkpointing.Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 2
  resumed = _palm_stage(tmp_path / "b", vocab, demo_data_dir, 4, monkeypatch)
  assert sorted(uninterrupted) == list(range(1, 5)) and len(set(uninterrupted.values())) == 4
  assert {**first, **resumed} == uninterrupted and sorted(resumed) == [3, 4]  # float equality of every loss
  params = [checkpointing.restore_any_params(tmp_path / run) for run in ("a", "b")]
  jax.tree.map(np.testing.assert_array_equal, *params)
  # The whole train state (Adam's moments, the step, the dropout RNG) has the same per-array checksums.
  states = [json.loads((tmp_path / run / "checkpoints" / "4" / checkpointing.CHECKSUMS_ITEM /
                         checkpointing.CHECKSUMS_FILE).read_text())["arrays"] for run in ("a", "b")]
  assert states[0] == states[1] and len(states[0]) > len(jax.tree.leaves(params[0]))
  assert "opt_state" in " ".join(states[0]) and "rng" in " ".join(states[0])
