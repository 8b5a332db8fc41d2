"""Per-channel normalisation shared by every data source."""

from typing import Sequence, Union

import numpy as np

Stat = Union[float, Sequence[float]]


def channel_stats(value: Stat, channels: int, name: str) -> np.ndarray:
  """`value` (one number, or one per channel) as a float32 array of shape `[channels]`."""
  arr = np.atleast_1d(np.asarray(value, np.float32))
  if arr.ndim != 1 or arr.size not in (1, channels):
    raise ValueError(f"config.data.{name} must be one number or {channels} numbers "
                     f"(one per channel), got {value!r}")
  return np.broadcast_to(arr, (channels,)).copy()


def normalize(images: np.ndarray, mean: Stat, std: Stat) -> np.ndarray:
  """uint8 (or [0, 255] float) images `[..., C]` -> float32 `(x / 255 - mean) / std`."""
  c = images.shape[-1]
  m, s = channel_stats(mean, c, "mean"), channel_stats(std, c, "std")
  if np.any(s <= 0):
    raise ValueError(f"config.data.std must be positive, got {std!r}")
  return (np.asarray(images, np.float32) / 255.0 - m) / s
