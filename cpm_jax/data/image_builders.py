"""TFDS builders of the embedded image-text data, written as array_record without TensorFlow (as builders.py).

  shapes_captions  procedural scenes of coloured shapes (cpm_jax.data.shapes) with a Chinese caption and one
                   question + answer each; numpy only
  digits_captions  scikit-learn's 1,797 handwritten digits (8x8, in the wheel) captioned "数字7"
  sample_photos    scikit-image's and scikit-learn's sample photos (in their wheels), each cut into crops and
                   captioned in Chinese by hand
Nothing is downloaded: the photos are read from the installed packages' files (the `images` extra). Every
record holds an uint8 `image` [height, width, channels] of the dataset's own size and a `caption`; models resize
(cpm_jax.data.images.model_input). Splits are deterministic (below, per builder).
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from cpm_jax.data import images, shapes

_IMAGE = tfds.features.Tensor(shape=(None, None, None), dtype=np.uint8, encoding="bytes")


def _info(builder: tfds.core.DatasetBuilder, homepage: str, features: dict) -> tfds.core.DatasetInfo:
  return tfds.core.DatasetInfo(builder=builder, description=builder.__doc__, homepage=homepage,
                               features=tfds.features.FeaturesDict({"image": _IMAGE, "caption": tfds.features.Text(),
                                                                    **features}),
                               disable_shuffling=True)


def package_file(package: str, relative: str) -> pathlib.Path:
  """A data file inside an installed package (the `images` extra), or an error saying what to install."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"The image datasets read files of the `{package}` package: "
                              "pip install 'cpm_jax[images]'.")
  path = pathlib.Path(spec.submodule_search_locations[0]) / relative
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the installed {package} package.")
  return path


class ShapesCaptions(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes in the quadrants of a 32x32 image, with a Chinese caption and one question + answer each.

  Scene i of a split is `shapes.render(np.random.default_rng([SEED, split number, i]))`, so every split is
  fixed by its seed: train 20,000 scenes, validation 500, test 1,000 (disjoint seeds).
  """

  name = "shapes_captions"
  VERSION = tfds.core.Version("1.0.0")
  SEED = 1998
  SPLITS = {"train": (0, 20_000), "validation": (1, 500), "test": (2, 1_000)}
  SIZE = 32

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return _info(self, "", {"question": text, "answer": text, "question_type": text})

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(number, count) for split, (number, count) in self.SPLITS.items()}

  def _generate_examples(self, split_number: int, count: int):
    for i in range(count):
      scene = shapes.render(np.random.default_rng([self.SEED, split_number, i]), self.SIZE)
      yield i, {"image": scene.image, "caption": scene.caption, "question": scene.question, "answer": scene.answer,
                "question_type": scene.question_type}


class DigitsCaptions(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits (1,797 8x8 images, ink 0-16 scaled to 0-255, one channel), captioned with
  their numeral: "数字7". Splits by index: i % 10 == 8 validation, == 9 test, the rest (80%) train."""

  name = "digits_captions"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self, "https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
                 {"label": tfds.features.ClassLabel(num_classes=10)})

  def _split_generators(self, dl_manager):
    rows = np.loadtxt(package_file("sklearn", "datasets/data/digits.csv.gz"), delimiter=",", dtype=np.int64)
    pixels, labels = rows[:, :-1].reshape(-1, 8, 8, 1), rows[:, -1]
    split_of = np.array(["train"] * 8 + ["validation", "test"])[np.arange(len(rows)) % 10]
    return {split: self._generate_examples(np.flatnonzero(split_of == split), pixels, labels)
            for split in ("train", "validation", "test")}

  def _generate_examples(self, indices, pixels, labels):
    for i in indices:
      image = np.rint(pixels[i] * 255 / 16).astype(np.uint8)
      yield int(i), {"image": image, "caption": f"数字{labels[i]}", "label": int(labels[i])}


# (package, file, caption): the sample photos shipped in the scikit-image and scikit-learn wheels.
PHOTOS = (
    ("skimage", "data/astronaut.png", "一位穿着宇航服的宇航员"),
    ("skimage", "data/brick.png", "一面灰色的砖墙"),
    ("skimage", "data/camera.png", "一个男人在用相机拍照"),
    ("skimage", "data/cell.png", "显微镜下的一个细胞"),
    ("skimage", "data/chelsea.png", "一只猫的脸"),
    ("skimage", "data/coffee.png", "一杯咖啡"),
    ("skimage", "data/coins.png", "许多枚硬币"),
    ("skimage", "data/color.png", "彩色的色轮"),
    ("skimage", "data/grass.png", "一片草地"),
    ("skimage", "data/gravel.png", "一片碎石"),
    ("skimage", "data/horse.png", "一匹黑色的马"),
    ("skimage", "data/hubble_deep_field.jpg", "太空中的许多星系"),
    ("skimage", "data/ihc.png", "显微镜下的组织切片"),
    ("skimage", "data/moon.png", "月球的表面"),
    ("skimage", "data/motorcycle_left.png", "一辆红色的摩托车"),
    ("skimage", "data/page.png", "一页印刷的文字"),
    ("skimage", "data/retina.jpg", "眼睛的视网膜"),
    ("skimage", "data/rocket.jpg", "夜晚发射台上的火箭"),
    ("skimage", "data/text.png", "手写的数学公式"),
    ("skimage", "data/clock_motion.png", "一个模糊的时钟"),
    ("sklearn", "datasets/images/china.jpg", "湖边的一座中国古塔"),
    ("sklearn", "datasets/images/flower.jpg", "一朵橙色的花"),
)


def _white_background(image: np.ndarray) -> np.ndarray:
  """RGBA composited over white (the horse is a silhouette on a transparent ground); other images unchanged."""
  if image.ndim == 3 and image.shape[-1] == 4:
    alpha = image[:, :, 3:].astype(np.float32) / 255
    return np.rint(image[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
  return image


class SamplePhotos(tfds.core.GeneratorBasedBuilder):
  """The 22 sample photos of the scikit-image and scikit-learn wheels (PHOTOS), each cut into CROPS square crops
  (side 60-100% of the short side, a random offset, flipped left-right half of the time; seeded per photo) resized
  to 64x64 RGB, captioned in Chinese. Splits by crop: crops 0-7 train, 8 validation, 9 test: held-out crops of
  photos seen in training, a check of recognition, not of generalisation."""

  name = "sample_photos"
  VERSION = tfds.core.Version("1.0.0")
  CROPS = 10
  SIZE = 64
  SEED = 2021

  def _info(self) -> tfds.core.DatasetInfo:
    return _info(self, "https://scikit-image.org/docs/stable/api/skimage.data.html",
                 {"photo": tfds.features.Text()})

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(range(8)), "validation": self._generate_examples([8]),
            "test": self._generate_examples([9])}

  def _generate_examples(self, crops):
    from skimage import io  # the `images` extra

    for number, (package, relative, text) in enumerate(PHOTOS):
      photo = images.to_rgb(_white_background(io.imread(package_file(package, relative))))
      rng = np.random.default_rng([self.SEED, number])
      draws = [(rng.uniform(0.6, 1.0), rng.uniform(size=2), rng.uniform() < 0.5) for _ in range(self.CROPS)]
      for crop in crops:
        scale, offset, flip = draws[crop]
        side = int(min(photo.shape[:2]) * scale)
        top, left = (offset * (np.array(photo.shape[:2]) - side)).astype(int)
        square = photo[top:top + side, left:left + side]
        square = square[:, ::-1] if flip else square
        image = np.clip(np.rint(images.resize(square, self.SIZE)), 0, 255).astype(np.uint8)
        yield f"{number}-{crop}", {"image": image, "caption": text, "photo": pathlib.Path(relative).stem}
