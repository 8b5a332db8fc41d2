"""Checks a run's config before any work: every problem found is named, nothing is half-done."""

import os

import ml_collections

from clamp_jax.data import SOURCES as DATA_SOURCES
from clamp_jax.data.calibration import SOURCES as REAL_SOURCES
from clamp_jax.generate import validate as validate_generate
from clamp_jax.generate.config import METHODS as GENERATED_SOURCES
from clamp_jax.models import model_family
from clamp_jax.models.quantized import validate as validate_quant
from clamp_jax.models.vit import compute_dtype
from clamp_jax.search.loop import validate as validate_search
from clamp_jax.search.reconstruct import validate as validate_reconstruct

NEEDS_CHECKPOINT = ("quantize", "generate", "eval")


def check_file(field: str, path: str, what: str) -> None:
  if not path:
    raise ValueError(f"config.{field} is empty: set it to {what}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.{field}={path!r} does not exist")


def check_data(data: ml_collections.ConfigDict, uses_train_split: bool) -> None:
  """The dataset's files or folder exist (TFDS is checked when it loads)."""
  if data.name not in DATA_SOURCES:
    raise ValueError(f"unknown config.data.name={data.name!r}; known: {list(DATA_SOURCES)}")
  if data.name == "fashion_mnist":
    from clamp_jax.data import fashion_mnist
    for split in ("train", "test") if uses_train_split else ("test",):
      fashion_mnist.split_files(split, data.dir)
  elif data.name == "folder":
    from clamp_jax.data import folder
    folder.resolve_root(data.dir, "")


def validate_run(config: ml_collections.ConfigDict, mode: str) -> None:
  """Raises (ValueError, FileNotFoundError) naming the first field a `mode` run cannot use."""
  model_family(config.model)
  compute_dtype(config.model)
  if mode == "eval" and config.model.quantized:
    check_file("model.quantized", config.model.quantized, "a run's quantized.npz")
  elif mode in NEEDS_CHECKPOINT:
    check_file("model.checkpoint", config.model.checkpoint, "a .npz or .safetensors file")
  if mode in ("quantize", "generate"):
    calib = config.calib
    if calib.source not in REAL_SOURCES + GENERATED_SOURCES:
      raise ValueError(f"unknown config.calib.source={calib.source!r}; "
                       f"known: {list(REAL_SOURCES + GENERATED_SOURCES)}")
    if calib.num_images < 1:
      raise ValueError(f"config.calib.num_images={calib.num_images} must be at least 1")
    validate_generate(config.generate)
  if mode == "quantize":
    validate_quant(config.quant)
    validate_search(config.search)
    validate_reconstruct(config.reconstruct)
    if config.quant.mixed and not config.search.enabled:
      raise ValueError("config.quant.mixed=True searches bits: it needs "
                       "config.search.enabled=True")
  uses_train = mode == "train" or (mode == "quantize" and config.calib.source == "real")
  check_data(config.data, uses_train)
