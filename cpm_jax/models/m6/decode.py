"""M6's decoding adapter for the shared loops (cpm_jax.decoding): text generated from an image and an optional
text prompt (image-to-text, image+text-to-text) or from a prompt alone (text-to-text).

The prefix — the image's patches and the text "<bos> prompt <sep>" — is encoded once by `prefill`, bidirectionally
as in training, into the cache: every generated token attends to its cached keys and values, and beam search
copies the cache rows instead of encoding the image again. Cache layout, one slot per position: the patches
(slots 0 .. patches - 1, empty for rows without an image), the left-padded prompt, then the generated tokens.
Decoding runs on `transformer.DecodeParams` made once by `decode_layout`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cpm_jax import decoding, logging_setup, partitioning, transformer
from cpm_jax.models.m6 import model
from cpm_jax.models.m6.vocab import CharVocab


def decode_layout(params: dict) -> transformer.DecodeParams:
  """`params` (training layout) converted for cached decoding, at the cost of one copy of the block weights."""
  return transformer.to_decode_params(params, [("blocks",)])


def cache_logical_axes(config: model.M6Config) -> dict:
  """Logical axes of the adapter's cache: the transformer's cache and each row's next text position."""
  return {"lm": transformer.cache_logical_axes(config.num_layers), "position": ("batch",)}


def prefill(params: transformer.DecodeParams, image_inputs: jax.Array, has_image: jax.Array, prompts: jax.Array,
            lengths: jax.Array, config: model.M6Config, cache_length: int) -> tuple[dict, jax.Array]:
  """Encodes the prefix once: the image side [batch, ...] (has_image [batch]: 0 leaves the patch slots empty) and
  left-padded text prefixes [batch, width] ("<bos> prompt <sep>", lengths [batch] >= 1), bidirectionally, into a
  fresh cache of `cache_length` slots.

  Returns (cache, last prefix token [batch]) for the decoding loops, whose first step feeds that token again: the
  cache index is left on its slot, so the step rewrites it. Computed causally over the prefix it sees the whole
  prefix, as it did bidirectionally, so the rewrite stores the same keys and values and yields the first target's
  logits exactly as the training forward does.
  """
  batch, width = prompts.shape
  start = width - lengths[:, None]
  columns = jnp.arange(width)[None, :]
  text_segments = (columns >= start).astype(jnp.int32)
  positions = jnp.maximum(columns - start, 0).astype(jnp.int32)
  tree = params.tree
  x = jnp.concatenate([model.embed_image(tree, image_inputs, config),
                       model.embed_text(tree, prompts, positions, config)], axis=1)
  segment_ids = jnp.concatenate([jnp.broadcast_to((has_image > 0).astype(jnp.int32)[:, None],
                                                  (batch, config.num_patches)), text_segments], axis=1)
  order = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), (batch, x.shape[1]))
  cache = transformer.constrain_cache(
      transformer.empty_cache(batch, cache_length, config.num_layers, config.num_heads, config.head_dim,
                              config.compute_dtype), transformer.cache_logical_axes(config.num_layers))
  _, cache = model.cached_hidden_states(params, x, config, cache, segment_ids=segment_ids, order=order, prefix=True)
  cache = {**cache, "index": cache["index"] - 1}
  return {"lm": cache, "position": positions[:, -1]}, prompts[:, -1]


def step_fn(config: model.M6Config) -> decoding.StepFn:
  """One cached step: tokens [batch, 1] at each row's next text position, in the next cache slot."""
  def step(params, tokens, cache):
    lm, position = cache["lm"], cache["position"]
    x = model.embed_text(params.tree, tokens, position[:, None], config)
    order = jnp.broadcast_to(lm["index"], tokens.shape).astype(jnp.int32)
    hidden, lm = model.cached_hidden_states(params, x, config, lm, segment_ids=jnp.ones_like(tokens), order=order,
                                            prefix=False)
    return model.logits_from_hidden(params.tree, hidden, config), {"lm": lm, "position": position + 1}
  return step


@functools.lru_cache(maxsize=None)
def _decoder(config: model.M6Config, decoding_config: decoding.DecodingConfig, eod_id: int, pad_id: int, mesh):
  """Jitted (decode params, image inputs, has_image, prefixes, lengths, rng) -> (tokens, lengths) for one setting
  (compiled per shape bucket); one per mesh, since the mesh in force when it is traced shapes its constraints."""
  del mesh
  step = step_fn(config)

  def run(params, image_inputs, has_image, prompts, lengths, rng):
    cache_length = config.num_patches + prompts.shape[1] - 1 + decoding_config.max_new_tokens
    cache, last = prefill(params, image_inputs, has_image, prompts, lengths, config, cache_length)
    # A repetition penalty counts the generated text only: the prompt is a question, not text to continue.
    return decoding_config.run(step, params, cache, cache_logical_axes(config), last, eod_id=eod_id,
                               pad_id=pad_id, vocab_size=config.vocab_size, rng=rng)

  return jax.jit(run)


def text_prefix(vocab: CharVocab, prompt: Sequence[int]) -> list[int]:
  """The text prefix a prompt's ids are generated from, as in training: <bos> prompt <sep>."""
  return [vocab.bos_id, *prompt, vocab.sep_id]


def generate(params: transformer.DecodeParams, prompts: Sequence[Sequence[int]], config: model.M6Config,
             decoding_config: decoding.DecodingConfig, vocab: CharVocab, *, image_inputs: np.ndarray | None = None,
             batch_size: int | None = None, strict: bool = False, mesh: jax.sharding.Mesh | None = None,
             progress: bool = False) -> list[list[int]]:
  """Generated ids (without <eod>) for each prompt's ids (possibly empty), from `decode_layout(params)`.

  image_inputs: one image (or patch-feature grid) per prompt, as the model reads them ([n, size, size, channels]
  float, cpm_jax.data.images.model_input; or [n, patches, feature_dim]); None generates from the text alone.
  Prompts go in batches of `batch_size` (default all; the last batch is padded so every batch has one shape); with
  `mesh`, activations and cache are sharded by the logical-axis rules. <eod> may end a text at any step.
  """
  if not prompts:
    return []
  if image_inputs is not None and len(image_inputs) != len(prompts):
    raise ValueError(f"{len(image_inputs)} images for {len(prompts)} prompts; give one image per prompt.")
  max_prefix = config.max_text_positions - decoding_config.max_new_tokens
  batch_size = batch_size or len(prompts)
  rng = jax.random.key(decoding_config.seed)
  run = _decoder(config, decoding_config.with_min_length_fraction(0.0).unseeded(), vocab.eod_id, vocab.pad_id, mesh)
  results = []
  starts = range(0, len(prompts), batch_size)
  for start in logging_setup.progress(starts, desc="generating", total=len(starts), unit="batches", enabled=progress):
    count = len(prompts[start:start + batch_size])
    chunk = [text_prefix(vocab, p) for p in prompts[start:start + batch_size]] + [[vocab.bos_id]] * (batch_size - count)
    tokens, lengths = decoding.prepare_prompts(chunk, max_prefix, eod_id=vocab.eod_id, pad_id=vocab.pad_id,
                                               strict=strict)
    images = np.zeros(config.image_input_shape(batch_size), np.float32)
    has_image = np.zeros((batch_size,), np.int32)
    if image_inputs is not None:
      images[:count] = image_inputs[start:start + count]
      has_image[:count] = 1
    with partitioning.on_mesh(mesh):
      out, out_lengths = run(params, images, has_image, tokens, lengths, jax.random.fold_in(rng, start))
    out, out_lengths = np.asarray(out), np.asarray(out_lengths)
    results += [out[i, :out_lengths[i]].tolist() for i in range(count)]
  return results
