"""FewShotModel: UniMC's block attention, the MLM-head class scores, each loss switch on a hand-made batch, and every
technique training the same on a sharded mesh as on one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _fewshot_helpers import fewshot_dir, fewshot_vocab, tiny_config  # noqa: F401  (session fixtures)
from cpm_jax import objectives, partitioning, training
from cpm_jax.data.fewshot import FewShotTask
from cpm_jax.models import plug
from cpm_jax.models.plug import fewshot_inputs
from cpm_jax.tokenization import BertTokenizer

UNIMC = fewshot_inputs.UniMCFormat(options=("差评", "好评"), text_template="{sentence}")


def _data(fewshot_dir, fewshot_vocab, input_format):  # noqa: F811
  """Batches of 8: the 3-per-class train sample and two pool examples that carry teacher logits."""
  task = FewShotTask(dataset=f"{fewshot_dir}/{{split}}.json", labels=("Negative", "Positive"), shots_per_class=3,
                     test_split="test_public")
  data = fewshot_inputs.FewShotData(vocab_path=str(fewshot_vocab), task=task, input_format=input_format, seq_len=32,
                                    global_batch_size=8)
  pool = data.splits.unlabeled[:2]
  teacher = tuple({**e, fewshot_inputs.TEACHER_LOGITS: [1.5, -0.5] if i else [-1.0, 2.0]} for i, e in enumerate(pool))
  return dataclasses.replace(data, extra_examples=teacher)


@pytest.fixture(scope="module")
def unimc_batch(fewshot_dir, fewshot_vocab):  # noqa: F811
  return next(_data(fewshot_dir, fewshot_vocab, UNIMC).train_iterator(seed=0))


@pytest.fixture(scope="module")
def vocab_size(fewshot_vocab):  # noqa: F811
  return BertTokenizer(fewshot_vocab).vocab_size


def test_unimc_options_see_only_themselves_and_the_shared_text(fewshot_vocab, vocab_size):  # noqa: F811
  tokenizer = BertTokenizer(fewshot_vocab)
  config = tiny_config(vocab_size)
  params = plug.init(config, jax.random.key(0))

  def hidden(options, blocks=True):
    unimc = dataclasses.replace(UNIMC, options=options)
    row = fewshot_inputs.features({"sentence": "物流很快"}, input_format=unimc, tokenizer=tokenizer, seq_len=32,
                                  num_classes=2, label=None, rng=None)
    batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
    return np.asarray(plug.encode(params, batch["inputs"], config, token_types=batch["token_types"],
                                  positions=batch["positions"], segment_ids=batch["segment_ids"],
                                  block_ids=batch["block_ids"] if blocks else None))[0]

  base, other = hidden(("差评", "好评")), hidden(("差评", "好用"))  # option 2 changes
  np.testing.assert_array_equal(base[1:4], other[1:4])  # option 1 ([MASK] 差 评) never sees option 2
  assert not np.allclose(base[4:7], other[4:7]) and not np.allclose(base[8:12], other[8:12])  # shared text sees it
  without_blocks = hidden(("差评", "好用"), blocks=False)
  assert not np.allclose(hidden(("差评", "好评"), blocks=False)[1:4], without_blocks[1:4])

  blocks = jnp.asarray([[0, 1, 1, 2, 2, 0, 0]])
  mask = np.asarray(plug.model.block_mask(blocks))[0, 0]
  b = np.asarray(blocks)[0]
  for q in range(7):
    for k in range(7):
      assert mask[q, k] == (b[q] == 0 or b[k] == 0 or b[q] == b[k]), (q, k)


def test_mlm_scores_equal_the_full_mlm_head(vocab_size):
  config = tiny_config(vocab_size)
  params = plug.init(config, jax.random.key(1))
  hidden = jax.random.normal(jax.random.key(2), (2, 9, config.embed_dim))
  positions = jnp.asarray([[3, 3], [1, 6]])
  ids = jnp.asarray([[7, 9], [11, 11]])
  full = plug.mlm_logits(params, hidden, config)
  expected = jnp.take_along_axis(jnp.take_along_axis(full, positions[..., None], 1), ids[..., None], 2)[..., 0]
  got = plug.model.mlm_scores(params, plug.model.at_positions(hidden, positions), ids, config)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)


def _loss(config, params, batch, rng, **switches):
  model = plug.FewShotModel(config, head="mlm", **switches)
  return float(jax.jit(lambda p, b, r: model.loss(p, b, r)[0])(params, batch, rng))


def test_loss_switches_on_a_hand_made_batch(unimc_batch, vocab_size):
  config = tiny_config(vocab_size, init_stddev=0.5)  # large weights: the rows' class scores differ
  params = plug.init(config, jax.random.key(3))
  batch = jax.tree.map(jnp.asarray, unimc_batch)
  rng = jax.random.key(4)
  model = plug.FewShotModel(config, head="mlm")
  loss = _loss(config, params, batch, rng)
  logits, embeddings, hidden = model.outputs(params, batch)
  labelled, teacher = batch["label_weights"], batch["teacher_weights"]
  rows = float(jnp.maximum(labelled, teacher).sum())
  assert float(teacher.sum()) == 2 and rows == 8
  np.testing.assert_allclose(loss, (labelled * objectives.cross_entropy(logits, batch["labels"])).sum() / rows,
                             rtol=1e-5)

  # Without dropout R-Drop's two passes agree (its KL term is 0), and mixup with alpha -> 0 mixes nothing.
  np.testing.assert_allclose(_loss(config, params, batch, rng, rdrop_weight=5.0, mixup_alpha=1e-6), loss, rtol=1e-6)
  assert abs(_loss(config, params, batch, rng, mixup_alpha=1.0) - loss) > 1e-3  # alpha 1 does mix
  dropped = dataclasses.replace(config, dropout_rate=0.1)
  assert _loss(dropped, params, batch, rng, rdrop_weight=5.0) > _loss(dropped, params, batch, rng,
                                                                      rdrop_weight=1e-9) + 1e-3

  # Contrastive, MLM and distillation add exactly their per-example terms (from-scratch recomputations).
  supcon = objectives.supervised_contrastive(embeddings, batch["labels"], labelled, 0.2).sum() / rows
  log_probs = np.asarray(jax.nn.log_softmax(plug.mlm_logits(params, hidden, config), -1))
  positions, targets = np.asarray(batch["mlm_positions"]), np.asarray(batch["mlm_targets"])
  weights = np.asarray(batch["mlm_weights"])
  assert weights.sum() > 8
  mlm = sum(-log_probs[b, p, t] * w / max(weights[b].sum(), 1) for b in range(8)
            for p, t, w in zip(positions[b], targets[b], weights[b])) / rows
  kl = float((teacher * objectives.distillation_kl(logits, batch["teacher_logits"], 2.0)).sum()) / rows
  combined = _loss(config, params, batch, rng, contrastive_weight=2.0, contrastive_temperature=0.2, mlm_weight=1.0,
                   distillation_weight=0.5, distillation_temperature=2.0)
  np.testing.assert_allclose(combined - loss, 2 * supcon + mlm + 0.5 * kl, rtol=1e-4)


def test_mixup_mixes_the_classifier_inputs_and_the_labels(unimc_batch, vocab_size):
  """The [CLS] classifier is linear after the pooled state, so mixing its inputs mixes its logits alike; the
  cross-entropy mixes the two labels with the same lambda (a numpy recomputation)."""
  config = tiny_config(vocab_size, num_classes=2, init_stddev=0.5)
  params = plug.init(config, jax.random.key(5))
  batch = jax.tree.map(jnp.asarray, unimc_batch)
  model = plug.FewShotModel(config, head="cls")
  partner, lam = jnp.asarray([3, 2, 1, 0, 5, 4, 7, 6]), jnp.asarray([1.0, 0.7, 0.6, 0.5, 0.9, 0.8, 1.0, 1.0])

  @jax.jit
  def run(params, batch, mixup):
    return model.outputs(params, batch)[0], model.outputs(params, batch, mixup=mixup)[0], model._pass(
        params, batch, None, mixup)[0]

  logits, mixed, terms = (np.asarray(x) for x in run(params, batch, (partner, lam)))
  lam_, partner_ = np.asarray(lam)[:, None], np.asarray(partner)
  np.testing.assert_allclose(mixed, lam_ * logits + (1 - lam_) * logits[partner_], rtol=1e-5, atol=1e-6)
  assert not np.allclose(mixed, logits)

  labels, weights = np.asarray(batch["labels"]), np.asarray(batch["label_weights"])
  log_probs = mixed - np.log(np.exp(mixed).sum(-1, keepdims=True))
  expected = weights * -(lam_[:, 0] * log_probs[range(8), labels] + (1 - lam_[:, 0]) * log_probs[range(8),
                                                                                                   labels[partner_]])
  np.testing.assert_allclose(terms, expected, rtol=1e-5, atol=1e-6)


MESH = dict(data=2, fsdp=2, tensor=2)


def test_every_technique_trains_the_same_on_a_sharded_mesh(fewshot_dir, fewshot_vocab, vocab_size):  # noqa: F811
  """UniMC with every switch on (R-Drop with dropout, mixup, contrastive, MLM, distillation): two steps on one device
  and on a data x fsdp x tensor mesh of 8 give the same losses and params. (The [CLS] head with the switches trains
  on that mesh in test_fewshot_recipe.py.)"""
  config = tiny_config(vocab_size, dropout_rate=0.1)
  data = _data(fewshot_dir, fewshot_vocab, UNIMC)
  batches = data.train_iterator(seed=1)
  batches = [next(batches) for _ in range(2)]
  model = plug.FewShotModel(config, head="mlm", mlm_weight=1.0, rdrop_weight=5.0, mixup_alpha=0.5,
                            contrastive_weight=0.5, distillation_weight=1.0, distillation_temperature=2.0)
  results = []
  for sizes in (dict(data=1, fsdp=1, tensor=1), MESH):
    count = int(np.prod(list(sizes.values())))
    mesh = partitioning.make_mesh(partitioning.MeshConfig(**sizes), devices=jax.devices()[:count])
    optimizer = training.make_optimizer(training.learning_rate_schedule(1e-2, 1, 10))
    steps = training.make_sharded_steps(model, optimizer, mesh)
    state = training.create_train_state(model, optimizer, mesh, seed=0)
    losses = []
    for batch in batches:
      state, metrics = steps.train(state, training.global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
      assert bool(metrics["finite"])
    results.append((losses, jax.tree.map(np.asarray, state.params)))
  (one_losses, one_params), (mesh_losses, mesh_params) = results
  np.testing.assert_allclose(mesh_losses, one_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5), mesh_params, one_params)
  assert not np.allclose(one_params["embed"]["wte"], plug.init(config, jax.random.key(0))["embed"]["wte"])


def _fit(model, batches, steps, lr):
  """The params after `steps` AdamW steps at `lr` on the cycled `batches`, one device."""
  mesh = partitioning.make_mesh(partitioning.MeshConfig(), devices=jax.devices()[:1])
  optimizer = training.make_optimizer(training.learning_rate_schedule(lr, 2, steps, decay="constant"))
  sharded = training.make_sharded_steps(model, optimizer, mesh)
  state = training.create_train_state(model, optimizer, mesh, seed=0)
  for step in range(steps):
    state, _ = sharded.train(state, training.global_batch(batches[step % len(batches)], mesh))
  return state.params


def _rows(data, examples):
  rows = [data.example_features({k: v for k, v in e.items() if k != data.task.label_field}, None) for e in examples]
  return {key: jnp.asarray(np.stack([row[key] for row in rows])) for key in rows[0]}


def test_unimc_learns_its_train_sample(fewshot_dir, fewshot_vocab, vocab_size):  # noqa: F811
  """UniMC's path (option blocks, 是 at each option's [MASK], its MLM) fits a toy sample from a fresh tiny encoder:
  the two option [MASK]s start with the same input, so only the options they see can tell the classes apart, and
  training does that. (On the table's stage-1 encoder the score difference starts at ~1e-3 and 60 steps at 5e-4 do
  not move it: BUILD.md, "Few-shot NLU".)"""
  data = _data(fewshot_dir, fewshot_vocab, UNIMC)
  iterator = data.train_iterator(seed=0)
  model = plug.FewShotModel(tiny_config(vocab_size), head="mlm", mlm_weight=1.0)
  params = _fit(model, [next(iterator) for _ in range(4)], steps=60, lr=1e-2)
  logits = np.asarray(model.outputs(params, _rows(data, data.splits.train))[0])
  labels = [data.task.labels.index(e["label"]) for e in data.splits.train]
  assert logits.argmax(-1).tolist() == labels


def test_a_student_learns_from_soft_labels_alone(fewshot_dir, fewshot_vocab, vocab_size):  # noqa: F811
  """Distillation: a fresh [CLS] student trained only on a teacher's logits (no labelled row) answers as the teacher
  does on those reviews; the student of the table answers the majority class because its teacher ("all") labels 92%
  of the pool negative with p(positive) <= 0.56."""
  data = _data(fewshot_dir, fewshot_vocab, fewshot_inputs.ClsFormat(templates=("{sentence}",)))
  reviews = [*data.splits.train, *data.splits.dev]
  teacher = [[2.0, -2.0] if e["label"] == "Negative" else [-2.0, 2.0] for e in reviews]
  soft = [{"sentence": e["sentence"], fewshot_inputs.TEACHER_LOGITS: t} for e, t in zip(reviews, teacher)]
  batch = _rows(data, soft)
  assert not batch["label_weights"].any() and batch["teacher_weights"].all()
  model = plug.FewShotModel(tiny_config(vocab_size, num_classes=2), head="cls", distillation_weight=1.0,
                            distillation_temperature=2.0)
  params = _fit(model, [jax.tree.map(np.asarray, batch)], steps=30, lr=1e-2)
  logits = np.asarray(model.outputs(params, batch)[0])
  assert logits.argmax(-1).tolist() == np.argmax(teacher, -1).tolist()
