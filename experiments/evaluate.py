r"""Evaluates a CPM, PLUG, KG (CPM-KM) or M6 checkpoint on a task configured in gin_configs/tasks/<task>.gin.

  python experiments/evaluate.py --checkpoint=/tmp/cpm_params --task=review_sentiment_zero_shot \
      --data_dir=/tmp/tfds --output=/tmp/eval/review_sentiment.json
  python experiments/evaluate.py --checkpoint=/tmp/cpm_params --task=lm_score --input_file=texts.jsonl \
      --predictions=/tmp/eval/scores.jsonl
  python experiments/evaluate.py --checkpoint=/tmp/plug_nlu --task=review_sentiment_classifier --data_dir=/tmp/tfds
  python experiments/evaluate.py --checkpoint=/tmp/plug_qg --task=plug_question_generation --input_file=dev.jsonl \
      --decoding=beam
  python experiments/evaluate.py --checkpoint=/tmp/kg_umls --task=link_prediction --data_dir=/tmp/tfds
  python experiments/evaluate.py --checkpoint=/tmp/kg_umls --task=kg_query --input_file=queries.jsonl \
      --print_predictions
  python experiments/evaluate.py --checkpoint=/tmp/m6_demo --task=shapes_vqa --data_dir=/tmp/tfds

--checkpoint: a params-only checkpoint (checkpointing.save_params / convert_checkpoint.py) or a training
workdir (its latest checkpoint); either records the model family, config and tokenizer. CPM-LM runs every
task; PLUG runs generation tasks (prompts '{source}[SEP]{second source}') and, fine-tuned with a classification
head, ClassificationTask; KG models run LinkPredictionTask (filtered MRR / Hits@k) and KGQueryTask (top-k tails of
a head and relation, with scores and entity names); M6 runs ImageTextTask (captions and answers about each example's
image; `ImageTextTask.with_image = False` for the text-only baseline) and the text tasks. Prints a table of the
metrics; --output gets metrics + per-example predictions as JSON, --predictions one JSON line per example.
"""

from __future__ import annotations

from absl import app, flags, logging

from cpm_jax import decoding, gin_setup, partitioning, programs, serving_weights
from cpm_jax.evaluation import model as model_lib
from cpm_jax.evaluation import report, tasks

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Params-only checkpoint or training workdir.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer (CPM: SentencePiece model; PLUG: vocab.txt); default: "
                                 "the one the checkpoint records.")
_TASK = flags.DEFINE_string("task", None, "A gin file in gin_configs/tasks/ (name without .gin) or a path.",
                            required=True)
_INPUT_FILE = flags.DEFINE_string("input_file", None, "CLUE-style jsonl to evaluate; default: the task's dataset.")
_TRAIN_FILE = flags.DEFINE_string("train_file", None, "jsonl of demonstrations for few-shot tasks; default: the "
                                  "task dataset's train split.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir for dataset-backed tasks (built on first use).")
_SPLIT = flags.DEFINE_string("split", None, "Dataset split to evaluate; default: the task's.")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate N examples drawn with the task's seed (not the first N: "
                              "splits are often sorted by label).")
_OUTPUT = flags.DEFINE_string("output", None, "JSON file for metrics and per-example predictions.")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "jsonl file with one prediction record per example.")
_PRINT_PREDICTIONS = flags.DEFINE_bool("print_predictions", False, "Also print each prediction record (one JSON line "
                                       "per example), e.g. the answers of a kg_query task.")
_UNTRAINED = flags.DEFINE_bool("untrained", False, "Evaluate freshly initialised params of the checkpoint's shape "
                                "instead of its weights: the chance baseline of a task.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per scoring / generation batch.")
_STRICT = flags.DEFINE_bool("strict", False, "Fail on inputs longer than the model's positions instead of "
                            "truncating them from the left.")
_DECODING = flags.DEFINE_enum("decoding", "greedy", ["greedy", "sample", "beam"], "Decoding for generation tasks "
                              "(SamplingConfig / BeamSearchConfig gin bindings set the rest).")
_WEIGHTS = flags.DEFINE_enum("weights", None, list(serving_weights.WEIGHTS), "Evaluate the weights as served "
                             "after this conversion (bfloat16, or int8 weight-only: scored with the dequantised "
                             "numbers the int8 decoder computes with; w8a8: int8 weights and activations, scored "
                             "through the decode path); default: as the checkpoint stores them.")
_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Extra gin files, e.g. meshes/tensor8_fsdp.gin.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'LabelPromptTask.shots = 2'.")


TASKS_DIR = gin_setup.GIN_CONFIGS_DIR / "tasks"


def task_gin_file(task: str) -> str:
  """The gin file of --task: a path ending in .gin, or a task of gin_configs/tasks/ by name."""
  if task.endswith(".gin"):
    return task
  if not (TASKS_DIR / f"{task}.gin").is_file():
    known = sorted(path.stem for path in TASKS_DIR.glob("*.gin"))
    raise app.UsageError(f"--task={task} is no task of {TASKS_DIR}; the tasks are {', '.join(known)} (or give the "
                         "path of a task's .gin file).")
  return f"tasks/{task}.gin"


def main(argv):
  del argv
  gin_setup.parse([task_gin_file(_TASK.value), *_GIN_FILES.value], _GIN_BINDINGS.value)
  task = tasks.configured_task()
  mesh = partitioning.make_mesh(partitioning.MeshConfig())
  decoding_config = {"greedy": lambda: decoding.SamplingConfig(greedy=True), "sample": decoding.SamplingConfig,
                     "beam": decoding.BeamSearchConfig}[_DECODING.value]()
  programs.require_existing(_CHECKPOINT, _INPUT_FILE, _TRAIN_FILE, _TOKENIZER)  # before the checkpoint is read
  examples = tasks.sample_examples(tasks.load_examples(task, _INPUT_FILE.value, _DATA_DIR.value, _SPLIT.value),
                                   _LIMIT.value, task.seed)
  demonstrations = []
  if task.shots:
    demonstrations = tasks.load_examples(task, _TRAIN_FILE.value, _DATA_DIR.value,
                                         None if _TRAIN_FILE.value else "train")
  task.check(examples, demonstrations)
  checkpoint = model_lib.load_checkpoint(_CHECKPOINT.value, mesh, serving=(task.serves, f"--task={_TASK.value}"))
  params = model_lib.untrained_params(checkpoint, mesh) if _UNTRAINED.value else None
  model = model_lib.language_model(checkpoint, model_lib.load_tokenizer(checkpoint, _TOKENIZER.value), params,
                                   batch_size=_BATCH_SIZE.value, decoding_config=decoding_config, mesh=mesh,
                                   strict=_STRICT.value, progress=True, weights=_WEIGHTS.value)
  logging.info("Task %s: %d examples, %d-shot.", task.name, len(examples), task.shots)
  result = task.evaluate(model, examples, demonstrations)
  if _PRINT_PREDICTIONS.value:
    print(report.jsonl_text(result.predictions), end="")
  print(report.table(task.name, result.metrics))
  source = _INPUT_FILE.value or f"{task.dataset}/{_SPLIT.value or task.split}"
  settings = {"checkpoint": _CHECKPOINT.value, "input": source, "shots": task.shots, "seed": task.seed,
              "decoding": _DECODING.value, "untrained": _UNTRAINED.value,
              "weights": _WEIGHTS.value or checkpoint.metadata.get("weights")}
  if _OUTPUT.value:
    report.write_result(_OUTPUT.value, task.name, result, settings)
  if _PREDICTIONS.value:
    report.write_jsonl(_PREDICTIONS.value, result.predictions)


if __name__ == "__main__":
  programs.run(main)
