"""M6: the mask of every mode, patch order, the precomputed-features interface, sizes from abstract shapes, and
cached generation (image prefix encoded once) against the full forward."""

import pathlib

import gin
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from cpm_jax import decoding, layers
from cpm_jax.models import m6
from cpm_jax.models.m6 import masks

TINY = m6.M6Config(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, max_text_positions=32, image_size=16,
                   patch_size=4, patch_encoder="conv", stem_width=8, dropout_rate=0.0)


class Vocab:  # the special ids of m6.CharVocab
  pad_id, unk_id, bos_id, sep_id, eod_id = range(5)


init = jax.jit(m6.init, static_argnums=0)
forward = jax.jit(m6.forward, static_argnums=3)
hidden_states = jax.jit(m6.hidden_states, static_argnums=3)
prefill = jax.jit(m6.prefill, static_argnums=(5, 6))


@pytest.fixture(scope="module")
def params():
  return init(TINY, jax.random.key(0))


def _rows(matrix: str) -> np.ndarray:
  return np.array([[c == "1" for c in row] for row in matrix.split()])


def test_each_mode_masks_exactly_as_written():
  # 2 patch slots, then 4 text slots; one row per mode.
  has_image = jnp.array([1, 1, 0, 0])
  text_segments = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
  prefix_lengths = jnp.array([2, 3, 2, 0])
  segments, mask = masks.mask(has_image, text_segments, prefix_lengths, num_patches=2)
  expected = {
      # image-to-text "<bos><sep>c c": patches + <bos><sep> see each other; the targets see them, then causally
      0: "111100 111100 111100 111100 111110 111111",
      # image+text-to-text "<bos> q <sep> | a" and one padding slot (sees nothing, seen by none)
      1: "111110 111110 111110 111110 111110 000000",
      # text prefix LM without an image: empty patch slots are never attended
      2: "000000 000000 001100 001100 001110 001111",
      # plain causal LM over two tokens
      3: "000000 000000 001000 001100 000000 000000",
  }
  for row, matrix in expected.items():
    np.testing.assert_array_equal(mask[row, 0], _rows(matrix), err_msg=f"row {row}")
  np.testing.assert_array_equal(segments[:, :2], [[1, 1], [1, 1], [0, 0], [0, 0]])


def _hidden(params, images, tokens, has_image, prefix_lengths):
  return hidden_states(params, images, tokens, TINY, has_image=has_image, prefix_lengths=prefix_lengths)


def test_prefix_is_bidirectional_and_never_sees_the_targets(params):
  images = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  tokens = jax.random.randint(jax.random.key(2), (2, 8), 5, 64)
  has_image, prefix_lengths = jnp.array([1, 0]), jnp.array([4, 4])  # image + 4 text tokens; text prefix of 4
  base = _hidden(params, images, tokens, has_image, prefix_lengths)
  patches = TINY.num_patches
  # The last prefix token changes every earlier prefix position (the patches too): no causal mask in the prefix.
  changed = _hidden(params, images, tokens.at[:, 3].set(63), has_image, prefix_lengths)
  assert np.abs(changed[0, :patches] - base[0, :patches]).min(-1).max() > 1e-4  # every patch moved
  for row in range(2):
    assert (np.abs(changed[row, patches:patches + 3] - base[row, patches:patches + 3]).max(-1) > 1e-4).all()
  # A target token changes nothing before it: neither the prefix nor the earlier targets.
  changed = _hidden(params, images, tokens.at[:, 6].set(63), has_image, prefix_lengths)
  np.testing.assert_allclose(changed[:, :patches + 6], base[:, :patches + 6], atol=1e-6)
  assert np.abs(changed[:, patches + 6] - base[:, patches + 6]).max() > 1e-4
  # Text-only rows do not see the (empty) patch slots: other pixels change nothing.
  changed = _hidden(params, images + 1.0, tokens, has_image, prefix_lengths)
  np.testing.assert_allclose(changed[1, patches:], base[1, patches:], atol=1e-6)


def test_patch_order_and_positions_round_trip(params):
  images = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  pieces = m6.patchify(images, 4)
  assert pieces.shape == (2, 16, 48)
  np.testing.assert_array_equal(m6.unpatchify(pieces, 4, 4, 3), images)
  rows, cols = m6.grid_positions(4)
  for k in range(16):
    np.testing.assert_array_equal(pieces[:, k].reshape(2, 4, 4, 3),
                                  images[:, 4 * rows[k]:4 * rows[k] + 4, 4 * cols[k]:4 * cols[k] + 4])
  np.testing.assert_array_equal(rows * 4 + cols, np.arange(16))
  # Each patch's embedding is its own pixels' encoding + its row and column embeddings + the image modality.
  zero_pixels = jax.tree.map(jnp.zeros_like, params["image"]["encoder"])
  embedded = m6.embed_image({**params, "image": {**params["image"], "encoder": zero_pixels}}, images, TINY)
  image = params["image"]
  np.testing.assert_allclose(embedded[0], image["row"][rows] + image["col"][cols] + params["modality"][0], atol=1e-6)
  # The conv stem runs on each patch alone: changing patch 5 changes patch 5's vector only.
  base = m6.embed_image(params, images, TINY)
  bumped = m6.embed_image(params, m6.unpatchify(pieces.at[:, 5].add(1.0), 4, 4, 3), TINY)
  moved = np.abs(bumped - base).max(-1)
  assert (moved[:, 5] > 1e-4).all() and np.delete(moved, 5, axis=1).max() < 1e-6


def test_precomputed_features_are_a_projection_like_the_linear_encoder():
  linear = m6.M6Config(**{**TINY.__dict__, "patch_encoder": "linear"})
  features = m6.M6Config(**{**TINY.__dict__, "patch_encoder": "features", "feature_dim": linear.patch_dim})
  params = init(linear, jax.random.key(4))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, m6.abstract_params(features))
  images = jax.random.normal(jax.random.key(5), (2, 16, 16, 3))
  tokens = jnp.array([[2, 3, 9, 10], [2, 7, 3, 11]])
  kwargs = dict(has_image=jnp.array([1, 1]), prefix_lengths=jnp.array([2, 3]))
  from_pixels = forward(params, images, tokens, linear, **kwargs)
  from_features = forward(params, m6.patchify(images, 4), tokens, features, **kwargs)
  np.testing.assert_allclose(from_features, from_pixels, atol=1e-5)
  assert features.image_input == "patch_features" and linear.image_input == "images"


def _expected_count(config: m6.M6Config) -> int:
  """Parameters counted by hand: blocks (QKV, output, MLP, 2 LayerNorms), embeddings, image side, final LN."""
  e, f = config.embed_dim, config.ffn_dim
  block = (3 * e * e + 3 * e) + (e * e + e) + (e * f + f) + (f * e + e) + 4 * e
  image = config.feature_dim * e + e + 2 * config.grid_size * e
  return config.num_layers * block + (config.vocab_size + config.max_text_positions + 2) * e + image + 2 * e


@pytest.mark.parametrize("name, low, high", [("m6_base", 3.2e8, 3.35e8), ("m6_10b", 9.5e9, 11.5e9)])
def test_gin_sizes_from_abstract_shapes(name, low, high):
  gin.clear_config()
  gin.add_config_file_search_path(str(pathlib.Path(__file__).resolve().parents[1] / "gin_configs"))
  gin.parse_config_file(f"models/{name}.gin")
  config = m6.M6Config()
  gin.clear_config()
  abstract = m6.abstract_params(config)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
  count = layers.count_params(abstract)
  assert count == _expected_count(config)
  assert low < count < high, count


# ---- cached generation -------------------------------------------------------------------------

PROMPTS = [[], [9, 10, 11], [12, 13]]  # caption, question about the image, text only
HAS_IMAGE = np.array([1, 1, 0], np.int32)


@pytest.fixture(scope="module")
def prefix_batch():
  images = np.asarray(jax.random.normal(jax.random.key(6), (3, 16, 16, 3)))
  tokens, lengths = decoding.prepare_prompts([m6.text_prefix(Vocab, p) for p in PROMPTS], 16, eod_id=Vocab.eod_id,
                                             pad_id=Vocab.pad_id)
  return images, tokens, lengths


def _full_logits(params, images, tokens_so_far):
  """Logits of each row's last token from the training forward over [image; <bos> prompt <sep> generated]
  (right-padded to one width, so one compiled forward serves every call)."""
  rows = [m6.text_prefix(Vocab, p) + list(g) for p, g in zip(PROMPTS, tokens_so_far)]
  tokens = np.zeros((3, 12), np.int32)
  segments = np.zeros((3, 12), np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)], segments[i, :len(row)] = row, 1
  logits = forward(params, images, tokens, TINY, has_image=HAS_IMAGE, segment_ids=segments,
                   prefix_lengths=np.array([len(p) + 2 for p in PROMPTS]))
  return np.stack([logits[i, len(row) - 1] for i, row in enumerate(rows)])


def test_cached_steps_equal_the_full_forward(params, prefix_batch):
  images, tokens, lengths = prefix_batch
  decode_params = m6.decode_layout(params)
  cache, last = prefill(decode_params, images, HAS_IMAGE, tokens, lengths, TINY, TINY.num_patches + 16 + 4)
  step = jax.jit(m6.step_fn(TINY))
  generated = [[] for _ in PROMPTS]
  for _ in range(4):
    logits, cache = step(decode_params, last[:, None], cache)
    np.testing.assert_allclose(logits[:, 0], _full_logits(params, images, generated), atol=2e-4)
    last = jnp.argmax(logits[:, 0], -1)
    for row, token in zip(generated, np.asarray(last)):
      row.append(int(token))
  # generate() (the shared greedy loop, image prefix in the cache) gives the same tokens.
  out = m6.generate(decode_params, PROMPTS, TINY, decoding.SamplingConfig(max_new_tokens=4, greedy=True), Vocab,
                    image_inputs=images)
  for row, out_row in zip(generated, out):  # generate() stops a row at <eod>
    assert out_row == row[:len(out_row)] and (len(out_row) == 4 or row[len(out_row)] == Vocab.eod_id)


def test_sampling_draws_from_the_full_forwards_top_k(params, prefix_batch):
  # Sampling runs the same cached steps: with top_k = 2 every drawn token is one of the two most likely under the
  # training forward over [image; prefix; tokens drawn so far].
  images = prefix_batch[0]
  sampled = m6.generate(m6.decode_layout(params), PROMPTS, TINY,
                        decoding.SamplingConfig(max_new_tokens=4, top_k=2, seed=1), Vocab, image_inputs=images)
  checked = 0
  for n in range(4):
    top_two = np.argsort(_full_logits(params, images, [row[:n] for row in sampled]), -1)[:, -2:]
    for row, allowed in zip(sampled, top_two):
      if n < len(row):
        assert row[n] in allowed, (n, row, allowed)
        checked += 1
  assert checked >= 6, sampled


def test_beam_search_scores_equal_the_full_forward(params, prefix_batch):
  # Beams reorder the cache (image prefix included) every step; a wrong reorder would score other tokens.
  images, tokens, lengths = prefix_batch
  decode_params = m6.decode_layout(params)
  config = decoding.BeamSearchConfig(max_new_tokens=3, beam_size=3, length_penalty=0.0, min_length=3)
  cache, last = prefill(decode_params, images, HAS_IMAGE, tokens, lengths, TINY, TINY.num_patches + 16 + 4)
  best, _, scores = decoding.beam_search_loop(m6.step_fn(TINY), decode_params, cache, m6.cache_logical_axes(TINY),
                                              last, config, eod_id=Vocab.eod_id, pad_id=Vocab.pad_id)
  best = np.asarray(best)
  total = np.zeros(3)
  for n in range(3):
    log_probs = jax.nn.log_softmax(_full_logits(params, images, best[:, :n]), -1)
    total += np.asarray(log_probs)[np.arange(3), best[:, n]]
  np.testing.assert_allclose(scores, total, atol=2e-4)


def test_the_image_prefix_is_encoded_once_not_per_step(params, prefix_batch):
  # The conv stem (patch encoder) runs in the prefill only: the decode loop's body holds no convolution.
  images, tokens, lengths = prefix_batch
  run = m6.decode._decoder(TINY, decoding.SamplingConfig(max_new_tokens=4, greedy=True, min_length=0),
                           Vocab.eod_id, Vocab.pad_id, None)
  jaxpr = jax.make_jaxpr(run)(m6.decode_layout(params), images, HAS_IMAGE, tokens, lengths, jax.random.key(0))

  def equations(jaxpr, inside_loop=False):
    """(primitive name, inside a while loop) of every equation, nested programs included."""
    for equation in jaxpr.eqns:
      yield equation.primitive.name, inside_loop
      for sub in jax.extend.core.jaxprs_in_params(equation.params):
        yield from equations(sub, inside_loop or equation.primitive.name == "while")

  found = list(equations(jaxpr.jaxpr))
  assert ("while", False) in found
  assert sum(name == "conv_general_dilated" for name, _ in found) == 3  # the stem's three convs, once
  assert not [name for name, inside in found if inside and name == "conv_general_dilated"]
