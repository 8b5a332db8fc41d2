"""Data sources: Fashion-MNIST (idx files), image folders, TFDS; all yield normalised NHWC float32."""

import re
from typing import Iterator, Tuple

import ml_collections
import numpy as np

from clamp_jax.data import fashion_mnist
from clamp_jax.data.preprocess import normalize

SOURCES = ("fashion_mnist", "folder", "tfds")


_SLICED = re.compile(r"^(\w+)\[(-?\d*):(-?\d*)\]$")


def parse_split(split: str) -> Tuple[str, slice]:
  """`("train", slice(58000, None))` of `"train[58000:]"` (TFDS's slice syntax, image indices,
  negative from the end); `(split, slice(None))` of a plain name."""
  if "[" not in split:
    return split, slice(None)
  match = _SLICED.match(split)
  if not match:
    raise ValueError(f"split {split!r}: a slice is written name[start:stop], e.g. 'train[-2000:]'")
  name, start, stop = match.groups()
  return name, slice(int(start) if start else None, int(stop) if stop else None)


def load_arrays(data: ml_collections.ConfigDict, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """A whole split, or a slice of one (`"train[-2000:]"`), in memory as
  `(uint8 images [N, H, W, C], int32 labels [N])`."""
  if data.name == "fashion_mnist":
    name, part = parse_split(split)
    images, labels = fashion_mnist.load(name, data.dir)
    return images[part], labels[part]
  raise ValueError(f"config.data.name={data.name!r} is streamed, not loaded into memory; "
                   f"use clamp_jax.data.batches (in-memory sources: ['fashion_mnist'])")


def batches(data: ml_collections.ConfigDict, split: str, batch_size: int,
            image_size: int, limit: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Normalised evaluation batches `(float32 [b, H, W, C], int32 [b])`; the first `limit` images if > 0."""
  if data.name not in SOURCES:
    raise ValueError(f"unknown config.data.name={data.name!r}; known: {SOURCES}")
  if data.name == "folder":
    from clamp_jax.data import folder
    if "[" in split:
      raise ValueError(f"split {split!r}: image folders take a folder name, not a slice")
    yield from folder.batches(data, split, batch_size, image_size, limit)
    return
  if data.name == "tfds":
    from clamp_jax.data import tfds_source
    yield from tfds_source.batches(data, split, batch_size, image_size, limit)
    return
  images, labels = load_arrays(data, split)
  if images.shape[1] != image_size or images.shape[2] != image_size:
    raise ValueError(f"{data.name} images are {images.shape[1]}x{images.shape[2]} but the "
                     f"model expects {image_size}x{image_size} (config.model.image_size)")
  n = min(limit, len(images)) if limit > 0 else len(images)
  for start in range(0, n, batch_size):
    stop = min(start + batch_size, n)
    yield normalize(images[start:stop], data.mean, data.std), labels[start:stop]
