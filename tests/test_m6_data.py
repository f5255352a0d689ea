"""M6's data: image resampling, the procedural shapes (captions checked against the pixels), the digits against
scikit-learn's loader, the character vocabulary, M6Data's multitask batches and what they need of the model."""

import dataclasses

import gin
import jax
import numpy as np
import pytest
from skimage import io as skimage_io

from _m6_helpers import TASKS, VOCAB_SIZE, SmallShapes, m6_data_dir  # noqa: F401  (session fixture)
from cpm_jax import gin_setup, model_fit
from cpm_jax.data import image_builders, images, shapes, sources
from cpm_jax.models import m6
from cpm_jax.models.m6 import data, vocab


def test_area_resampling():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
  np.testing.assert_allclose(images.resize(image, 16), np.repeat(np.repeat(image, 2, 0), 2, 1), atol=1e-4)
  blocks = image.astype(np.float32).reshape(4, 2, 4, 2, 3).mean((1, 3))
  np.testing.assert_allclose(images.resize(image, 4), blocks, atol=1e-4)
  for size_in, size_out in [(5, 3), (3, 7), (64, 32)]:
    np.testing.assert_allclose(images.area_weights(size_in, size_out).sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(images.resize(np.full((5, 7, 3), 9.0), 3), 9.0, rtol=1e-6)
  grey = images.model_input(np.full((8, 8, 1), 255, np.uint8), 32)
  assert grey.shape == (32, 32, 3) and np.allclose(grey, 1.0)
  assert np.allclose(images.model_input(np.zeros((4, 4, 4), np.uint8), 8), -1.0)  # RGBA: alpha dropped


def test_image_files_read_back_exactly_and_bad_ones_are_named(tmp_path):
  image = np.random.default_rng(1).integers(0, 256, (6, 5, 3)).astype(np.uint8)
  skimage_io.imsave(tmp_path / "a.png", image, check_contrast=False)
  np.testing.assert_array_equal(images.read_file(str(tmp_path / "a.png")), image)
  (tmp_path / "b.png").write_text("not an image", encoding="utf-8")
  with pytest.raises(ValueError, match=r"b\.png: not a readable image file"):
    images.read_file(str(tmp_path / "b.png"))


def test_shape_captions_and_answers_describe_the_pixels():
  background = np.float32(235)
  for i in range(40):
    scene = shapes.render(np.random.default_rng([7, i]))
    again = shapes.render(np.random.default_rng([7, i]))  # deterministic
    assert np.array_equal(scene.image, again.image) and (scene.caption, scene.question) == (again.caption,
                                                                                          again.question)
    pixels = scene.image.astype(np.float32)
    described = {s.position: s for s in scene.shapes}
    for quadrant in range(4):
      row, col = divmod(quadrant, 2)
      block = pixels[16 * row:16 * row + 16, 16 * col:16 * col + 16]
      if quadrant not in described:
        assert np.abs(block - background).max() < 40, (i, quadrant)  # background noise only
        continue
      shape = described[quadrant]
      # The stated colour: the palette colour nearest the quadrant's most inked pixel.
      ink = np.abs(block - background).sum(-1)
      darkest = block.reshape(-1, 3)[ink.argmax()]
      nearest = min(shapes.COLORS, key=lambda name: np.square(darkest - shapes.COLORS[name]).sum())
      assert nearest == shape.color, (i, scene.caption)
      # The stated kind: the shape's area (its coverage, from how far each pixel is from the background towards
      # the shape's colour) over its width x height (the widest row's and tallest column's coverage): 1 for a
      # square, pi/4 for a circle, 1/2 for a triangle.
      cover = np.clip(((block - background) @ (darkest - background)) / np.square(darkest - background).sum(), 0, 1)
      ratio = cover.sum() / (cover.sum(1).max() * cover.sum(0).max())
      fill = {"正方形": 1.0, "圆形": np.pi / 4, "三角形": 0.5}
      assert min(fill, key=lambda k: abs(fill[k] - ratio)) == shape.kind, (i, scene.caption, ratio)
    assert scene.caption == "，".join(f"{shapes.POSITIONS[s.position]}有一个{s.color}的{s.kind}"
                                     for s in scene.shapes) + "。"
    if scene.question_type == "count_all":
      assert scene.answer == shapes.COUNTS[len(scene.shapes)]
    if scene.question_type == "count_shape":
      kind = scene.question[len("图中有几个"):-1]
      assert scene.answer == shapes.COUNTS[sum(s.kind == kind for s in scene.shapes)]


def test_shapes_builder_records_are_the_seeded_scenes(m6_data_dir):  # noqa: F811
  for split, (number, count) in SmallShapes.SPLITS.items():
    records = sources.load_examples("shapes_captions", split, m6_data_dir)
    assert len(records) == count
    for i in (0, count - 1):
      scene = shapes.render(np.random.default_rng([SmallShapes.SEED, number, i]))
      np.testing.assert_array_equal(records[i]["image"], scene.image)
      assert (records[i]["caption"], records[i]["question"], records[i]["answer"]) == (scene.caption, scene.question,
                                                                                      scene.answer)


def test_digits_are_scikit_learns(m6_data_dir):  # noqa: F811
  from sklearn.datasets import load_digits

  reference = load_digits()
  splits = {s: sources.load_split("digits_captions", s, m6_data_dir) for s in ("train", "validation", "test")}
  assert {s: len(v) for s, v in splits.items()} == {"train": 1439, "validation": 179, "test": 179}
  test = splits["test"].__getitems__(range(3))
  for k, record in enumerate(test):
    index = 10 * k + 9
    np.testing.assert_allclose(record["image"][:, :, 0] * (16 / 255), reference.images[index], atol=16 / 255 / 2)
    assert record["label"] == reference.target[index] and record["caption"].decode() == f"数字{reference.target[index]}"


def test_sample_photos_ship_in_the_wheels():
  for package, relative, caption in image_builders.PHOTOS:
    assert image_builders.package_file(package, relative).stat().st_size > 1000 and caption


def test_char_vocab(tmp_path):
  built = vocab.build(["红色的圆形"], ["人民日报人民", "日 红"], tmp_path / "v.txt", size=12)
  # specials, the required characters, then the most frequent others (ties by code point), no whitespace
  assert built.tokens[:5] == list(vocab.SPECIALS) and set(built.tokens[5:10]) == set("红色的圆形")
  assert built.tokens[10:] == ["人", "日"] and built.vocab_size == 12
  ids = built.encode("红色的猫")
  assert ids[-1] == built.unk_id and built.decode([built.bos_id, *ids, built.eod_id]) == "红色的\ufffd"
  assert built.decode([ids[0], 12, 40]) == "红\ufffd\ufffd"  # padded embedding rows a model generated: unknown
  with pytest.raises(ValueError, match="cannot hold the 10 required"):
    vocab.build(["红色的圆形"], [], tmp_path / "w.txt", size=9)
  (tmp_path / "bad.txt").write_text("a\nb\n", encoding="utf-8")
  with pytest.raises(ValueError, match="bad.txt: the first lines must be the special tokens"):
    vocab.CharVocab(tmp_path / "bad.txt")


@pytest.fixture(scope="module")
def m6_data(m6_data_dir):  # noqa: F811
  return data.M6Data(data_dir=str(m6_data_dir), vocab_path=str(m6_data_dir / "chars.txt"), vocab_size=VOCAB_SIZE,
                     mixture=tuple((name, 1.0) for name in TASKS), image_size=16, seq_len=24, global_batch_size=16,
                     eval_examples=4)


def test_batches_mix_every_mode_with_the_right_targets(m6_data):
  chars = m6_data.vocab
  iterator = m6_data.train_iterator(seed=0)
  batch = next(iterator)
  assert batch["images"].shape == (16, 16, 16, 3) and batch["inputs"].shape == (16, 24)
  modes = set()
  for row in range(16):
    inputs, weights, prefix = batch["inputs"][row], batch["weights"][row], int(batch["prefix_lengths"][row])
    n = int(batch["segment_ids"][row].sum())
    np.testing.assert_array_equal(batch["targets"][row, :n - 1], inputs[1:n])
    assert inputs[0] == chars.bos_id
    if prefix:  # "<bos> prompt <sep>" is the prefix; the targets after it carry the weight
      assert inputs[prefix - 1] == chars.sep_id and chars.sep_id not in inputs[1:prefix - 1]
    np.testing.assert_array_equal(weights, (np.arange(24) >= max(prefix - 1, 0)) & (np.arange(24) < n))
    has_image = bool(batch["has_image"][row])
    assert has_image == bool(np.abs(batch["images"][row]).sum())
    modes.add((has_image, prefix == 0, prefix > 2))
  assert modes == {(True, False, False), (True, False, True), (False, False, True), (False, True, False)}, modes
  # The iterator resumes exactly from a saved state.
  state = iterator.get_state()
  following = next(iterator)
  resumed = m6_data.train_iterator(seed=0)
  resumed.set_state(state)
  for key, value in next(resumed).items():
    np.testing.assert_array_equal(value, following[key], err_msg=key)


def test_eval_batches_are_fixed_and_padded(m6_data):
  first, second = list(m6_data.eval_batches()), list(m6_data.eval_batches())
  assert len(first) == 2  # 5 tasks x 4 examples in batches of 16, the last padded
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert first[1]["weights"][4:].sum() == 0 and first[1]["weights"][:4].sum() > 0
  assert m6_data.checkpoint_metadata() == {"tokenizer": m6_data.resolved_vocab_path}


def test_model_fit_takes_the_vocab_and_image_size_from_the_data_and_names_bad_sizes(m6_data):
  gin.clear_config()
  try:
    fitted = model_fit.fit(m6.M6Model(m6.M6Config(max_text_positions=24, patch_size=4)), m6_data).config
    assert (fitted.vocab_size, fitted.image_size) == (m6_data.vocab.vocab_size, 16)
    gin_setup.parse([], ["M6Config.vocab_size = 100"])
    with pytest.raises(gin_setup.ConfigError, match=r"M6Config.vocab_size = 100 is too small for the data: the "
                       r"vocabulary M6Data.vocab_path = .* needs at least"):
      model_fit.fit(m6.M6Model(m6.M6Config()), m6_data)
  finally:
    gin.clear_config()
  with pytest.raises(gin_setup.ConfigError, match=r"M6Config.max_text_positions = 16 .* M6Data.seq_len = 24 needs"):
    model_fit.fit(m6.M6Model(m6.M6Config(max_text_positions=16)), m6_data)
  # A config for larger images than the data's would misread them: the loss names both settings.
  model = m6.M6Model(dataclasses.replace(fitted, image_size=32, patch_size=8))
  batch = next(iter(m6_data.eval_batches()))
  with pytest.raises(ValueError, match=r"M6 batch 'images' has shape \(16, 16, 16, 3\); M6Config expects "
                     r"\(16, 32, 32, 3\) \(M6Data.image_size and M6Config.image_size must agree\)"):
    jax.eval_shape(model.loss, m6.abstract_params(model.config), batch)


def test_each_process_reads_its_share(m6_data):
  # Evaluation: every process makes the same global batches and keeps its rows, so two emulated hosts' rows put
  # together are the one-host batches. Training: each host reads its own examples (a different first batch).
  hosts = [dataclasses.replace(m6_data, process_index=i, process_count=2) for i in range(2)]
  for whole, *halves in zip(m6_data.eval_batches(), *(host.eval_batches() for host in hosts)):
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([half[key] for half in halves]), whole[key], err_msg=key)
  first, second = (next(host.train_iterator(seed=0)) for host in hosts)
  assert first["inputs"].shape == (8, 24) and not np.array_equal(first["inputs"], second["inputs"])
