"""ImageNet-style image folders (`dir/[split/]class_name/image.jpg`), streamed in sorted order."""

import concurrent.futures
import functools
import math
import os
from typing import Iterator, List, Tuple, Union

import ml_collections
import numpy as np
from PIL import Image

from clamp_jax.data.preprocess import normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRESET_STATS = {"deit": (IMAGENET_MEAN, IMAGENET_STD), "vit": (0.5, 0.5)}
# "deit": timm eval (shorter side to size / 0.875, bicubic, center crop); "vit": google-research
# eval (bilinear resize to the square); "": no resizing, images must already have the model's size.
PRESETS = ("deit", "vit", "")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEIT_CROP_PCT = 0.875
_DECODE_THREADS = 4


def check_preset(preset: str) -> str:
  """`preset` if known, else a ValueError naming config.data.preset."""
  if preset not in PRESETS:
    raise ValueError(f"unknown config.data.preset={preset!r}; known: {list(PRESETS)}")
  return preset


def _resize_shorter_center_crop(image: Image.Image, image_size: int) -> Image.Image:
  """Shorter side to floor(image_size / 0.875) (bicubic), then the central square crop."""
  size = math.floor(image_size / DEIT_CROP_PCT)
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  image = image.resize((new_w, new_h), Image.BICUBIC)
  top = int(round((new_h - image_size) / 2.0))
  left = int(round((new_w - image_size) / 2.0))
  return image.crop((left, top, left + image_size, top + image_size))


def _to_pil(image: Union[Image.Image, np.ndarray]) -> Image.Image:
  if isinstance(image, Image.Image):
    return image
  array = np.asarray(image)
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return Image.fromarray(array)


def resize_crop(image: Union[Image.Image, np.ndarray], image_size: int, preset: str) -> np.ndarray:
  """One image (PIL, or uint8 HWC array) -> uint8 `[image_size, image_size, C]` per `preset`.

  "deit" and "vit" give RGB (C=3); "" returns the image unchanged after checking its size.
  """
  if check_preset(preset) == "":
    array = np.asarray(image)
    if array.shape[:2] != (image_size, image_size):
      raise ValueError(f"an image is {array.shape[0]}x{array.shape[1]} but the model expects "
                       f"{image_size}x{image_size} and config.data.preset='' does not resize; "
                       f"set config.data.preset to one of {list(PRESETS[:-1])}")
    return array
  image = _to_pil(image).convert("RGB")
  if preset == "deit":
    image = _resize_shorter_center_crop(image, image_size)
  else:
    image = image.resize((image_size, image_size), Image.BILINEAR)
  return np.asarray(image, np.uint8)


def _class_names(root: str) -> List[str]:
  return sorted(e.name for e in os.scandir(root) if e.is_dir())


def resolve_root(data_dir: str, split: str) -> str:
  """`data_dir/split` if it holds class sub-folders, else `data_dir` itself."""
  if not data_dir or not os.path.isdir(data_dir):
    raise FileNotFoundError(f"image folder {data_dir!r} not found; set config.data.dir to a "
                            f"directory with one sub-folder of images per class")
  split_dir = os.path.join(data_dir, split) if split else ""
  if split_dir and os.path.isdir(split_dir) and _class_names(split_dir):
    return split_dir
  return data_dir


def list_images(root: str) -> Tuple[List[str], np.ndarray, List[str]]:
  """`(paths, int32 labels, class_names)`: classes are the sorted sub-folders of `root`."""
  class_names = _class_names(root)
  if not class_names:
    raise ValueError(f"{root} has no class sub-folders; config.data.dir must hold one "
                     f"folder of images per class (or a <split> folder that does)")
  paths, labels = [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(root, name)
    files = sorted(e.name for e in os.scandir(class_dir)
                   if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    paths += [os.path.join(class_dir, f) for f in files]
    labels += [label] * len(files)
  if not paths:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the {len(class_names)} "
                     f"class folders of {root} (config.data.dir)")
  return paths, np.asarray(labels, np.int32), class_names


def _load(path: str, image_size: int, preset: str) -> np.ndarray:
  with Image.open(path) as image:
    try:
      return resize_crop(image.convert("RGB"), image_size, preset)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e


def batches(data: ml_collections.ConfigDict, split: str, batch_size: int,
            image_size: int, limit: int = 0) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """Normalised batches `(float32 [b, S, S, 3], int32 [b])`, each decoded only when it is due."""
  preset = check_preset(data.preset)
  paths, labels, _ = list_images(resolve_root(data.dir, split))
  n = min(limit, len(paths)) if limit > 0 else len(paths)
  load = functools.partial(_load, image_size=image_size, preset=preset)
  with concurrent.futures.ThreadPoolExecutor(_DECODE_THREADS) as pool:
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      images = np.stack(list(pool.map(load, paths[start:stop])))
      yield normalize(images, data.mean, data.std), labels[start:stop]
