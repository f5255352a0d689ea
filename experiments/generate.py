r"""Generates text with a CPM checkpoint (continuations of prompts), a PLUG one (the decoder's output for an
encoder input such as 'answer[SEP]context') or an M6 one (text about an image: --image per prompt, --prompt=''
captions it; without --image, text from the prompt alone); sampling or beam search, on device.

  python experiments/generate.py --checkpoint=/tmp/cpm_params --prompt='今天天气' --top_k=20 --top_p=0.9
  python experiments/generate.py --checkpoint=/tmp/cpm_params --input_file=prompts.jsonl --output=out.jsonl \
      --beam_size=5
  python experiments/generate.py --checkpoint=/tmp/plug_qg --prompt='北京[SEP]中国的首都是北京。' --top_k=20 \
      --temperature=0.9
  python experiments/generate.py --checkpoint=/tmp/m6_demo --image=scene.png --prompt='' --image=scene.png \
      --prompt='图中有几个三角形？' --greedy --max_new_tokens=40

  python experiments/generate.py --checkpoint=/tmp/cpm_params --prompt='今天天气' --stream --long_text \
      --max_new_tokens=3000 --max_sentences=20 --weights=int8

--checkpoint: a params-only checkpoint (checkpointing.save_params / convert_checkpoint.py) or a training
workdir; its model family, config and tokenizer are read from it. Without --output each prompt and its
generation are printed; with it, one JSON line {"prompt", "generated"} per prompt. --stream prints each prompt's
text as it is produced (one prompt at a time: batch 1). Stop strings, --max_sentences and --max_seconds are
checked on the host between steps (a streamed loop for each batch); <eod> ends a text on device.
--long_text goes past the model's positions by its family's protocol: CPM a sliding window (gin SlidingWindow.length
/ .stride), PLUG the released re-encoding every 128 tokens (gin LongText.*; prompts are texts to continue), CPM-XL
its memory (always).
"""

from __future__ import annotations

import dataclasses
import re

from absl import app, flags

from cpm_jax import decoding, gin_setup, partitioning, programs, serving_weights
from cpm_jax.data import images
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import report, tasks

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Params-only checkpoint or training workdir.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer (CPM: SentencePiece model; PLUG: vocab.txt); default: "
                                 "the one the checkpoint records.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_INPUT_FILE = flags.DEFINE_string("input_file", None, "jsonl with one prompt per line in field --prompt_field.")
_PROMPT_FIELD = flags.DEFINE_string("prompt_field", "prompt", "Field of --input_file lines holding the prompt.")
_IMAGE = flags.DEFINE_multi_string("image", [], "Image-text models (M6): an image file for each --prompt, in order; "
                                   "the generation is about the image.")
_IMAGE_FIELD = flags.DEFINE_string("image_field", None, "Field of --input_file lines holding an image file path "
                                   "(image-text models), as --image.")
_OUTPUT = flags.DEFINE_string("output", None, "jsonl output; default: print to stdout.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most (stops at <eod>).")
_GREEDY = flags.DEFINE_bool("greedy", False, "Greedy decoding instead of sampling.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (applied after top-k and top-p).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus: keep the smallest set of tokens with this probability.")
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0, "CTRL's penalty on tokens already present.")
_NO_REPEAT_NGRAM_SIZE = flags.DEFINE_integer("no_repeat_ngram_size", 0, "Ban every token that would repeat an "
                                             "n-gram (this many tokens) of the prompt or the text so far (0: off).")
_SUPPRESS_IDS = flags.DEFINE_multi_integer("suppress_tokens", [], "A token id never to generate (repeatable; "
                                           "transformers' suppress_tokens).")
_SUPPRESS_UNK = flags.DEFINE_bool("suppress_unk", False, "Never generate the tokenizer's unknown token (<unk>, "
                                  "[UNK]), which reads as a placeholder in the text.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same prompts -> same output).")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", 0, "Beam search with this many beams (0: sampling).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.6, "Beam search: GNMT alpha in ((5 + len) / 6) ** alpha.")
_MIN_LENGTH = flags.DEFINE_integer("min_length", None, "No end token (<eod>, PLUG's [SEP]) before this many new "
                                   "tokens (default: the model's release protocol: 0 for CPM and for beam search; "
                                   "PLUG samples none before 80% of --max_new_tokens).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per compiled batch.")
_STRICT = flags.DEFINE_bool("strict", False, "Fail on prompts longer than the model's positions allow instead of "
                            "keeping their last tokens.")
_STREAM = flags.DEFINE_bool("stream", False, "Print each prompt's text as it is produced (batch 1; not with beam "
                            "search).")
_STOP = flags.DEFINE_multi_string("stop", [], "End a text at this string (kept; repeatable: the first found).")
_MAX_SENTENCES = flags.DEFINE_integer("max_sentences", None, "End a text after this many sentences (。！？!?…).")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", None, "End a batch's texts after this many seconds of decoding.")
_LONG_TEXT = flags.DEFINE_bool("long_text", False, "Generate past the model's positions by its family's protocol "
                               "(CPM: a sliding window; PLUG: the released long-text re-encoding).")
_WEIGHTS = flags.DEFINE_enum("weights", None, list(serving_weights.WEIGHTS), "Serve the weights converted once to "
                             "this (int8: weight-only, a scale per output channel; w8a8: the same int8 weights "
                             "with activations quantised per row at each product); default: as the checkpoint "
                             "stores them (int8 for an int8 checkpoint).")
_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files, e.g. meshes/tensor8_fsdp.gin.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings.")


def decoding_config() -> decoding.DecodingConfig:
  """The decoding the flags ask for; a value out of range is an error naming its flag."""
  try:
    return _decoding_config()
  except ValueError as e:  # the configs name their fields, which the flags here set
    raise ValueError(re.sub(r"\b(?:SamplingConfig|BeamSearchConfig)\.(\w+)", r"--\1", str(e).splitlines()[0])) from e


def _decoding_config() -> decoding.DecodingConfig:
  if _BEAM_SIZE.value:
    return decoding.BeamSearchConfig(max_new_tokens=_MAX_NEW_TOKENS.value, beam_size=_BEAM_SIZE.value,
                                     length_penalty=_LENGTH_PENALTY.value, min_length=_MIN_LENGTH.value or 0,
                                     no_repeat_ngram_size=_NO_REPEAT_NGRAM_SIZE.value,
                                     suppress_tokens=tuple(_SUPPRESS_IDS.value))
  return decoding.SamplingConfig(max_new_tokens=_MAX_NEW_TOKENS.value, greedy=_GREEDY.value,
                                 temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                                 repetition_penalty=_REPETITION_PENALTY.value,
                                 no_repeat_ngram_size=_NO_REPEAT_NGRAM_SIZE.value,
                                 suppress_tokens=tuple(_SUPPRESS_IDS.value), min_length=_MIN_LENGTH.value,
                                 seed=_SEED.value)


def stop_criteria() -> decoding.StopCriteria:
  return decoding.StopCriteria(stop_strings=tuple(_STOP.value), max_sentences=_MAX_SENTENCES.value,
                               max_seconds=_MAX_SECONDS.value)


def read_prompts() -> tuple[list[str], list[str]]:
  """(the prompts, the image file of each, or none without --image / --image_field)."""
  prompts, image_files = list(_PROMPT.value), list(_IMAGE.value)
  if image_files and len(image_files) != len(prompts):
    raise app.UsageError(f"{len(image_files)} --image for {len(prompts)} --prompt: give one image per prompt.")
  if _INPUT_FILE.value:
    fields = {_PROMPT_FIELD.value: "--prompt_field"}
    if _IMAGE_FIELD.value:
      fields[_IMAGE_FIELD.value] = "--image_field"
    for example in tasks.read_jsonl(_INPUT_FILE.value):
      for field, flag in fields.items():
        if field not in example:
          raise ValueError(f"{example[tasks.WHERE]}: no field {field!r} ({flag}).")
      prompts.append(str(example[_PROMPT_FIELD.value]))
      if _IMAGE_FIELD.value:
        image_files.append(str(example[_IMAGE_FIELD.value]))
  if not prompts:
    raise app.UsageError("Give --prompt or --input_file.")
  if image_files and len(image_files) != len(prompts):
    raise app.UsageError("--image and --image_field give images for some prompts only: give one for each.")
  return prompts, image_files


def main(argv):
  del argv
  gin_setup.parse(_GIN_FILES.value, _GIN_BINDINGS.value)
  programs.require_existing(_CHECKPOINT, _INPUT_FILE, _TOKENIZER)  # cheap checks before the checkpoint is read
  prompts, image_files = read_prompts()
  pixels = [images.read_file(path) for path in image_files]
  config = decoding_config()  # validates the sampling flags before the checkpoint is read
  stop = stop_criteria()
  if _STREAM.value and _BEAM_SIZE.value:
    raise app.UsageError("--stream needs sampling or greedy decoding, not --beam_size.")
  if pixels and (_STREAM.value or stop.active):
    raise app.UsageError("--image generates whole texts: --stream, --stop, --max_sentences and --max_seconds "
                         "are for text prompts only.")
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  checkpoint = model_lib.load_checkpoint(_CHECKPOINT.value, mesh, serving=("text", "generate.py"))
  tokenizer = model_lib.load_tokenizer(checkpoint, _TOKENIZER.value)
  if _SUPPRESS_UNK.value:
    config = dataclasses.replace(config, suppress_tokens=(*config.suppress_tokens, tokenizer.unk_id))
  model = model_lib.language_model(checkpoint, tokenizer, batch_size=_BATCH_SIZE.value, decoding_config=config,
                                   mesh=mesh, strict=_STRICT.value, weights=_WEIGHTS.value, long_text=_LONG_TEXT.value)
  separator = "" if model.continues_prompt else "\n=> "
  if _STREAM.value:
    outputs = []
    for prompt in prompts:
      print(f"{prompt}{separator}", end="", flush=True)
      text = ""
      for piece, in model.stream_text([prompt], stop):
        print(piece, end="", flush=True)
        text += piece
      outputs.append(text)
      print("\n", flush=True)
  elif pixels:
    outputs = model.describe_text(pixels, prompts)
  elif stop.active:
    outputs = []
    for start in range(0, len(prompts), _BATCH_SIZE.value):
      outputs += model.generate_text(prompts[start:start + _BATCH_SIZE.value], stop)
  else:
    outputs = model.generate_text(prompts)
  records = [{"prompt": p, "generated": g} for p, g in zip(prompts, outputs)]
  for record, path in zip(records, image_files):
    record["image"] = path
  if _OUTPUT.value:
    report.write_jsonl(_OUTPUT.value, records)
  elif not _STREAM.value:
    for record in records:
      image = f"[{record['image']}] " if "image" in record else ""
      print(f"{image}{record['prompt']}{separator}{record['generated']}\n")


if __name__ == "__main__":
  programs.run(main)
