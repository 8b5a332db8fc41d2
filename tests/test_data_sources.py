"""Image-folder and TFDS sources: tiny folders written with PIL, a fake `tensorflow_datasets`."""

import sys
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

import clamp_jax.data
from clamp_jax.data import folder, tfds_source

MEAN, STD = folder.IMAGENET_MEAN, folder.IMAGENET_STD


def data_config(data_dir, preset="deit", **overrides):
  mean, std = folder.PRESET_STATS.get(preset, (0.5, 0.5))
  fields = dict(name="folder", dir=str(data_dir), mean=mean, std=std, preset=preset, tfds_name="")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def noise(h, w, seed, channels=3):
  return np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)


def save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture
def image_dir(tmp_path):
  """Classes ant (2 images), bee (none), cat (3 images); stray non-image files are ignored."""
  save(tmp_path / "cat" / "c2.bmp", noise(20, 20, 4))
  save(tmp_path / "cat" / "c0.png", noise(32, 32, 2))
  save(tmp_path / "cat" / "c1.jpeg", noise(24, 40, 3))
  save(tmp_path / "ant" / "a1.JPG", noise(50, 30, 1))
  save(tmp_path / "ant" / "a0.png", noise(30, 40, 0))
  (tmp_path / "bee").mkdir()
  (tmp_path / "cat" / "notes.txt").write_text("not an image")
  (tmp_path / "README").write_text("not a class")
  return tmp_path


def test_list_images_sorted_classes_and_files(image_dir):
  paths, labels, classes = folder.list_images(str(image_dir))
  assert classes == ["ant", "bee", "cat"]
  assert [p.split("/")[-1] for p in paths] == ["a0.png", "a1.JPG", "c0.png", "c1.jpeg", "c2.bmp"]
  assert labels.dtype == np.int32 and labels.tolist() == [0, 0, 2, 2, 2]


@pytest.mark.parametrize("preset", ["deit", "vit"])
def test_batches_shapes_and_partial_last_batch(image_dir, preset):
  out = list(folder.batches(data_config(image_dir, preset), "validation", 2, 16, 0))
  assert [len(y) for _, y in out] == [2, 2, 1]
  for x, y in out:
    assert x.dtype == np.float32 and x.shape == (len(y), 16, 16, 3)
    assert y.dtype == np.int32
  assert np.concatenate([y for _, y in out]).tolist() == [0, 0, 2, 2, 2]


def test_limit_takes_the_first_images_in_order(image_dir):
  out = list(folder.batches(data_config(image_dir), "validation", 2, 16, limit=3))
  assert [y.tolist() for _, y in out] == [[0, 0], [2]]


def test_dispatcher_streams_folders(image_dir):
  out = list(clamp_jax.data.batches(data_config(image_dir), "validation", 4, 16))
  assert [len(y) for _, y in out] == [4, 1]


def reference_normalize(image):
  return (np.asarray(image, np.float32) / 255.0 - np.asarray(MEAN)) / np.asarray(STD)


def test_deit_preset_matches_resize_shorter_side_and_center_crop(image_dir):
  # a0.png is 40 wide, 30 high; image_size 16 -> shorter side 18 -> 24x18, crop offsets (4, 1).
  x, _ = next(folder.batches(data_config(image_dir), "validation", 1, 16, limit=1))
  with Image.open(image_dir / "ant" / "a0.png") as image:
    expected = reference_normalize(image.resize((24, 18), Image.BICUBIC).crop((4, 1, 20, 17)))
  np.testing.assert_allclose(x[0], expected, rtol=1e-5, atol=1e-5)


def test_deit_center_crop_rounds_half_to_even():
  # 36 wide, 50 high -> 18x25; the vertical offset (25 - 16) / 2 = 4.5 rounds to 4 like timm.
  array = noise(50, 36, 5)
  expected = Image.fromarray(array).resize((18, 25), Image.BICUBIC).crop((1, 4, 17, 20))
  np.testing.assert_array_equal(folder.resize_crop(array, 16, "deit"), np.asarray(expected))


def test_vit_preset_maps_black_to_minus_one_and_white_to_plus_one(tmp_path):
  save(tmp_path / "black" / "0.png", np.zeros((20, 30, 3), np.uint8))
  save(tmp_path / "white" / "0.png", np.full((30, 20, 3), 255, np.uint8))
  x, y = next(folder.batches(data_config(tmp_path, "vit"), "validation", 2, 8))
  assert x.shape == (2, 8, 8, 3) and y.tolist() == [0, 1]
  np.testing.assert_allclose(x[0], -1.0)
  np.testing.assert_allclose(x[1], 1.0)


def test_split_subfolder_is_used_when_it_holds_classes(tmp_path):
  save(tmp_path / "val" / "a" / "0.png", noise(16, 16, 0))
  save(tmp_path / "val" / "b" / "0.png", noise(16, 16, 1))
  assert folder.resolve_root(str(tmp_path), "val") == str(tmp_path / "val")
  assert folder.resolve_root(str(tmp_path), "test") == str(tmp_path)
  _, y = next(folder.batches(data_config(tmp_path), "val", 4, 16))
  assert y.tolist() == [0, 1]


def test_missing_dir_is_named(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere.*config.data.dir"):
    next(folder.batches(data_config(missing), "validation", 2, 16))


def test_folder_without_classes_or_images(tmp_path):
  with pytest.raises(ValueError, match="no class sub-folders"):
    folder.list_images(str(tmp_path))
  (tmp_path / "empty_class").mkdir()
  with pytest.raises(ValueError, match="no images"):
    folder.list_images(str(tmp_path))


def test_unknown_preset(image_dir):
  with pytest.raises(ValueError, match="unknown config.data.preset='inception'.*deit"):
    next(folder.batches(data_config(image_dir, "inception"), "validation", 2, 16))


def test_no_preset_requires_the_model_size(image_dir):
  with pytest.raises(ValueError, match="a0.png.*30x40.*16x16.*config.data.preset"):
    next(folder.batches(data_config(image_dir, ""), "validation", 2, 16))


def fake_tfds(monkeypatch, examples):
  """Installs a `tensorflow_datasets` whose `load` returns `examples`; returns its load calls."""
  calls = []

  def load(name, **kwargs):
    calls.append((name, kwargs))
    return examples

  module = types.ModuleType("tensorflow_datasets")
  module.load = load
  module.as_numpy = lambda ds: ds
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
  return calls


def tfds_config(preset, **overrides):
  return data_config("", preset, **{"name": "tfds", "tfds_name": "fashion_mnist", **overrides})


def test_tfds_passes_model_sized_images_through(monkeypatch):
  examples = [{"image": noise(8, 8, i, channels=1), "label": i % 3} for i in range(5)]
  calls = fake_tfds(monkeypatch, examples)
  out = list(tfds_source.batches(tfds_config("", mean=0.0, std=1.0), "test", 2, 8))
  assert calls == [("fashion_mnist", dict(split="test", data_dir=None, shuffle_files=False))]
  assert [x.shape for x, _ in out] == [(2, 8, 8, 1), (2, 8, 8, 1), (1, 8, 8, 1)]
  assert np.concatenate([y for _, y in out]).tolist() == [0, 1, 2, 0, 1]
  assert out[0][1].dtype == np.int32 and out[0][0].dtype == np.float32
  np.testing.assert_allclose(out[2][0][0], examples[4]["image"] / 255.0, rtol=1e-6)


def test_tfds_applies_the_folder_preset_and_limit(monkeypatch, tmp_path):
  examples = [{"image": noise(30, 40, 0), "label": 7}, {"image": noise(12, 10, 1, 1), "label": 3},
              {"image": noise(9, 9, 2), "label": 1}]
  calls = fake_tfds(monkeypatch, examples)
  config = tfds_config("deit", dir=str(tmp_path), tfds_name="imagenet2012")
  (x, y), = tfds_source.batches(config, "validation", 4, 16, limit=2)
  assert calls[0][1]["data_dir"] == str(tmp_path)
  assert x.shape == (2, 16, 16, 3) and y.tolist() == [7, 3]
  expected = reference_normalize(folder.resize_crop(examples[0]["image"], 16, "deit"))
  np.testing.assert_allclose(x[0], expected, rtol=1e-5, atol=1e-5)


def test_tfds_needs_a_dataset_name(monkeypatch):
  fake_tfds(monkeypatch, [])
  with pytest.raises(ValueError, match="config.data.tfds_name"):
    next(tfds_source.batches(tfds_config("vit", tfds_name=""), "test", 2, 8))


def test_tfds_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
    next(tfds_source.batches(tfds_config("vit"), "test", 2, 8))


def fmnist_data():
  return ml_collections.ConfigDict(dict(name="fashion_mnist", dir="", mean=0.0, std=1.0,
                                        preset="", tfds_name=""))


def test_a_fashion_mnist_split_slice_takes_those_images():
  images, labels = clamp_jax.data.load_arrays(fmnist_data(), "test")
  tail, tail_labels = clamp_jax.data.load_arrays(fmnist_data(), "test[-300:]")
  middle, _ = clamp_jax.data.load_arrays(fmnist_data(), "test[100:250]")
  np.testing.assert_array_equal(tail, images[-300:])
  np.testing.assert_array_equal(tail_labels, labels[-300:])
  np.testing.assert_array_equal(middle, images[100:250])
  batches = list(clamp_jax.data.batches(fmnist_data(), "test[9900:]", 64, 28))
  assert [len(b[0]) for b in batches] == [64, 36]
  np.testing.assert_array_equal(batches[-1][1], labels[-36:])


def test_real_calibration_images_come_from_their_split_slice():
  from clamp_jax.data.calibration import calibration_images
  from clamp_jax.data.preprocess import normalize
  from configs import fmnist_vit
  config = fmnist_vit.get_config("tiny")
  config.calib.update(source="real", split="train[:40]", num_images=16)
  images = calibration_images(config)
  first, _ = clamp_jax.data.load_arrays(config.data, "train[:40]")
  pool = normalize(first, config.data.mean, config.data.std).reshape(40, -1)
  matches = [np.flatnonzero(np.all(pool == image.reshape(1, -1), axis=1)) for image in images]
  assert all(len(m) >= 1 for m in matches)
  assert len({int(m[0]) for m in matches}) == 16  # without replacement
  config.calib.split = "train[:10]"
  with pytest.raises(ValueError, match=r"calib.split='train\[:10\]' holds 10 images"):
    calibration_images(config)


@pytest.mark.parametrize("split", ["test[", "test[a:b]", "test[1:2:3]"])
def test_a_malformed_split_slice_is_named(split):
  with pytest.raises(ValueError, match=r"name\[start:stop\]"):
    clamp_jax.data.load_arrays(fmnist_data(), split)


def test_image_folders_refuse_a_split_slice(image_dir):
  with pytest.raises(ValueError, match="not a slice"):
    next(clamp_jax.data.batches(data_config(image_dir), "val[:10]", 2, 16))
