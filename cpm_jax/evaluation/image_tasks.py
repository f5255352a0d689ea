"""Image-text tasks: captioning and visual question answering, configured by gin files (gin_configs/tasks/).

ImageTextTask is a GenerationTask whose generations are about each example's image (LanguageModel.describe):
the prompt template fills in the example's fields (empty for a caption; "{question}" for VQA), the generation is
compared with the reference field by the shared metrics (BLEU-1..4, ROUGE-L, exact match; VQA accuracy is exact
match). `with_image = False` asks the same model with the prompt alone: the text-only baseline, which can only
answer from the prompt (the most common answer). `group_field` adds exact match per value of a field (e.g. the
question type).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import gin
import numpy as np

from cpm_jax.evaluation import metrics
from cpm_jax.evaluation.interface import LanguageModel
from cpm_jax.evaluation.tasks import GenerationTask, where


@gin.configurable
@dataclasses.dataclass(kw_only=True)
class ImageTextTask(GenerationTask):
  """Generate text about `image_field` from `prompt_template`; score against `reference_field`."""

  image_field: str = "image"
  reference_field: str = "caption"
  metrics: Sequence[str] = ("bleu", "rouge_l", "em")
  stop_at: str = ""
  with_image: bool = True
  group_field: str = ""

  def generate(self, model: LanguageModel, examples: Sequence[dict], prompts: list[list[int]]) -> list[list[int]]:
    if not self.with_image:
      return model.generate(prompts)
    if model.describe is None:
      raise ValueError(f"Task {self.name!r} needs an image-text model (one whose LanguageModel has describe, "
                       "e.g. M6); bind ImageTextTask.with_image = False to ask a text model the prompts alone.")
    for i, example in enumerate(examples):
      if self.image_field not in example:
        raise ValueError(f"{where(example, i)}: no image field {self.image_field!r} (task {self.name!r}).")
    return model.describe([np.asarray(e[self.image_field]) for e in examples], prompts)

  def evaluate(self, model, examples, demonstrations=()):
    result = super().evaluate(model, examples, demonstrations)
    if self.group_field:
      groups = collections.defaultdict(list)
      for i, (example, prediction) in enumerate(zip(examples, result.predictions)):
        if self.group_field not in example:
          raise ValueError(f"{where(example, i)}: no field {self.group_field!r} (ImageTextTask.group_field).")
        groups[str(example[self.group_field])].append(metrics.exact_match(prediction["generated"],
                                                                          prediction["references"]))
      result.metrics.update({f"em/{group}": float(np.mean(values)) for group, values in sorted(groups.items())})
    result.metrics["with_image"] = float(self.with_image)
    return result
