"""Calibration images: a few real training images, or Gaussian noise in the normalised input space."""

import ml_collections
import numpy as np

from clamp_jax import data as data_lib
from clamp_jax.data.preprocess import normalize

SOURCES = ("real", "gaussian")


def calibration_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """`config.calib.num_images` float32 images `[N, S, S, C]` from `config.calib.source` (`real`:
  drawn without replacement from `config.calib.split`, a split or a slice like `train[:30000]`)."""
  calib, model = config.calib, config.model
  if calib.num_images < 1:
    raise ValueError(f"config.calib.num_images={calib.num_images} must be at least 1")
  rng = np.random.default_rng(calib.seed)
  shape = (calib.num_images, model.image_size, model.image_size, model.channels)
  if calib.source == "gaussian":
    return rng.standard_normal(shape).astype(np.float32)
  if calib.source == "real":
    images, _ = data_lib.load_arrays(config.data, calib.split)
    if len(images) < calib.num_images:
      raise ValueError(f"config.calib.split={calib.split!r} holds {len(images)} images, fewer "
                       f"than config.calib.num_images={calib.num_images}")
    chosen = rng.choice(len(images), calib.num_images, replace=False)
    return normalize(images[np.sort(chosen)], config.data.mean, config.data.std)
  raise ValueError(f"unknown config.calib.source={calib.source!r}; known: {list(SOURCES)} "
                   f"(and the generators 'psaq', 'clamp')")
