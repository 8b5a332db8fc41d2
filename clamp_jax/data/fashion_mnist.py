"""Fashion-MNIST from its idx `.gz` files (Debian: `apt-get install dataset-fashion-mnist`)."""

import gzip
import os

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
MEAN, STD = 0.2860, 0.3530  # of the training images scaled to [0, 1]
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: str) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f"{path} is not an unsigned-byte idx file")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape}, file holds {array.size} values")
  return array.reshape(shape)


def split_files(split: str, data_dir: str = "") -> list:
  """The image and label files of `split`; raises naming the missing ones and how to install them."""
  if split not in _FILES:
    raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FILES)}, got {split!r}")
  data_dir = data_dir or DEFAULT_DIR
  paths = [os.path.join(data_dir, name) for name in _FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST files not found: {missing}. Install them with "
        f"`apt-get install dataset-fashion-mnist` (they go to {DEFAULT_DIR}) "
        f"or set config.data.dir to a directory holding the idx .gz files.")
  return paths


def load(split: str, data_dir: str = "") -> tuple:
  """`(images uint8 [N, 28, 28, 1], labels int32 [N])` of split "train" or "test"."""
  paths = split_files(split, data_dir)
  images, labels = (_read_idx(p) for p in paths)
  if len(images) != len(labels):
    raise ValueError(f"{os.path.dirname(paths[0])}: {len(images)} images but {len(labels)} labels")
  return images[..., None], labels.astype(np.int32)
