"""Data sources: Fashion-MNIST (idx files), image folders, TFDS; all yield normalised NHWC float32."""

from typing import Iterator, Tuple

import ml_collections
import numpy as np

from clamp_jax.data import fashion_mnist
from clamp_jax.data.preprocess import normalize

SOURCES = ("fashion_mnist", "folder", "tfds")


def load_arrays(data: ml_collections.ConfigDict, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """A whole split in memory as `(uint8 images [N, H, W, C], int32 labels [N])`."""
  if data.name == "fashion_mnist":
    return fashion_mnist.load(split, data.dir)
  raise ValueError(f"config.data.name={data.name!r} is streamed, not loaded into memory; "
                   f"use clamp_jax.data.batches (in-memory sources: ['fashion_mnist'])")


def batches(data: ml_collections.ConfigDict, split: str, batch_size: int,
            image_size: int, limit: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Normalised evaluation batches `(float32 [b, H, W, C], int32 [b])`; the first `limit` images if > 0."""
  if data.name not in SOURCES:
    raise ValueError(f"unknown config.data.name={data.name!r}; known: {SOURCES}")
  if data.name == "folder":
    from clamp_jax.data import folder
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
