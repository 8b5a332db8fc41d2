"""Optional TFDS source (`pip install tensorflow-datasets tensorflow`), preprocessed like folders."""

import itertools
from typing import Iterable, Iterator, List, Tuple

import ml_collections
import numpy as np

from clamp_jax.data import folder
from clamp_jax.data.preprocess import normalize


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("config.data.name='tfds' needs TensorFlow Datasets: "
                      "pip install tensorflow-datasets tensorflow") from e
  return tfds


def _chunks(items: Iterable, size: int) -> Iterator[List]:
  it = iter(items)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


def batches(data: ml_collections.ConfigDict, split: str, batch_size: int,
            image_size: int, limit: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Normalised batches `(float32 [b, S, S, C], int32 [b])` of `config.data.tfds_name`."""
  preset = folder.check_preset(data.preset)
  if not data.tfds_name:
    raise ValueError("config.data.tfds_name is empty; name the TFDS dataset to read "
                     "(e.g. 'imagenet2012') when config.data.name='tfds'")
  tfds = _import_tfds()
  ds = tfds.load(data.tfds_name, split=split, data_dir=data.dir or None, shuffle_files=False)
  examples = tfds.as_numpy(ds)
  if limit > 0:
    examples = itertools.islice(examples, limit)
  for chunk in _chunks(examples, batch_size):
    images = np.stack([folder.resize_crop(e["image"], image_size, preset) for e in chunk])
    labels = np.asarray([e["label"] for e in chunk], np.int32)
    yield normalize(images, data.mean, data.std), labels
