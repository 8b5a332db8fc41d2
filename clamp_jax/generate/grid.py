"""A PNG contact sheet of generated images, for looking at what the generator made."""

import math

import numpy as np
from PIL import Image

from clamp_jax.data.preprocess import Stat, channel_stats
from clamp_jax.files import atomic_path


def image_grid(images, mean: Stat, std: Stat, pad: int = 2) -> np.ndarray:
  """`[B, H, W, C]` normalised images -> one uint8 sheet
  `[rows * (H + pad) + pad, cols * (W + pad) + pad, C]`: de-normalised (`x * std + mean`), clipped
  to [0, 1], `ceil(sqrt(B))` columns, black gaps of `pad` pixels."""
  images = np.asarray(images, np.float32)
  b, h, w, c = images.shape
  pixels = np.clip(images * channel_stats(std, c, "std") + channel_stats(mean, c, "mean"), 0, 1)
  cols = math.ceil(math.sqrt(b))
  rows = math.ceil(b / cols)
  sheet = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
  for i, img in enumerate(np.round(pixels * 255).astype(np.uint8)):
    y, x = pad + (i // cols) * (h + pad), pad + (i % cols) * (w + pad)
    sheet[y:y + h, x:x + w] = img
  return sheet


def save_png_grid(path: str, images, mean: Stat, std: Stat) -> None:
  """Writes `image_grid(images, mean, std)` as a PNG at `path`, atomically."""
  sheet = image_grid(images, mean, std)
  with atomic_path(path) as tmp:
    Image.fromarray(sheet[..., 0] if sheet.shape[-1] == 1 else sheet).save(tmp, format="PNG")
