"""Load a float checkpoint of any supported format into our ViT, reading its shape from the file.

A file that cannot be read as weights raises `CheckpointError`, one line starting with its path;
one whose names or shapes do not fit the model raises `CheckpointMismatchError`.
"""

import contextlib
import os
import re
import zipfile
import zlib
from typing import Collection, Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clamp_jax.files import atomic_path
from clamp_jax.models.checkpoints import formats
from clamp_jax.models.presets import build_model, model_family

Flat = formats.Flat
CheckpointError = formats.CheckpointError


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model: lists missing, unexpected and mis-shaped names."""


def read_flat(path: str) -> Flat:
  """All arrays of a `.npz` or `.safetensors` file, by name; `CheckpointError` if malformed."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(".npz"):
    return _read_npz(path)
  raise CheckpointError(f"{path}: unknown checkpoint extension "
                        f"{os.path.splitext(path)[1] or '(none)'!r}: expected .npz or .safetensors")


def _read_safetensors(path: str) -> Flat:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    return dict(load_file(path))
  except SafetensorError as e:
    raise CheckpointError(f"{path}: not a valid .safetensors file ({e})") from e


def _read_npz(path: str) -> Flat:
  try:
    if not zipfile.is_zipfile(path):
      raise zipfile.BadZipFile("truncated or not a zip archive")
    with np.load(path, allow_pickle=False) as f:
      return {key: _npz_array(f, key, path) for key in f.files}
  except zipfile.BadZipFile as e:
    raise CheckpointError(f"{path}: not a valid .npz file ({e})") from e


def _npz_array(npz, key: str, path: str) -> np.ndarray:
  """One member of an open `.npz`; `CheckpointError` names it when it is no numeric array."""
  try:
    value = npz[key]
  except (zipfile.BadZipFile, EOFError, zlib.error, ValueError) as e:
    what = "holds Python objects, not numbers" if "allow_pickle" in str(e) else f"is damaged ({e})"
    raise CheckpointError(f"{path}: array {key!r} {what}") from e
  if not isinstance(value, np.ndarray):
    raise CheckpointError(f"{path}: member {key!r} is not a .npy array")
  return value


def check_floats(flat: Flat, path: str) -> None:
  """`CheckpointError` naming the first array that is not floating point (weights are)."""
  for key, value in flat.items():
    if not jnp.issubdtype(value.dtype, jnp.floating):
      raise CheckpointError(f"{path}: array {key!r} has dtype {value.dtype}; expected "
                            "floating-point weights")


def save_vit_npz(path: str, params) -> None:
  """Writes `params` as a vision_transformer `.npz` (flat `/`-joined names), atomically."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  with atomic_path(path) as tmp:
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})


def infer_shape(flat: Flat) -> Dict:
  """The model fields a checkpoint in our layout determines (not `num_heads` for timm)."""
  def need(key, ndim):
    if key not in flat:
      raise CheckpointMismatchError(f"checkpoint is missing {key!r}, needed to read the model shape")
    if flat[key].ndim != ndim:
      raise CheckpointMismatchError(f"{key} has shape {flat[key].shape}; expected {ndim} axes")
    return flat[key].shape

  kh, _, channels, hidden = need("embedding/kernel", 4)
  layers = {int(m.group(1)) for k in flat for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m}
  shape = dict(patch_size=int(kh), channels=int(channels), hidden_size=int(hidden),
               num_layers=len(layers), pool="tok" if "cls" in flat else "gap",
               num_classes=int(need("head/kernel", 2)[-1]),
               mlp_dim=int(need("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", 2)[-1]),
               representation_size=int(flat["pre_logits/kernel"].shape[-1])
               if "pre_logits/kernel" in flat else 0)
  query = flat.get("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel")
  if query is not None and query.ndim == 3:
    shape["num_heads"] = int(query.shape[1])
  return shape


def resample_posemb(posemb: np.ndarray, num_prefix: int, grid: Tuple[int, int]) -> np.ndarray:
  """Bilinear resampling of the patch part of `(1, prefix + gh * gw, D)` to `grid`."""
  prefix, patches = posemb[:, :num_prefix], posemb[0, num_prefix:]
  old = int(round(np.sqrt(len(patches))))
  if old * old != len(patches):
    raise CheckpointMismatchError(f"position embedding of {len(patches)} patch tokens is not a "
                                  f"square grid; cannot resample it to {grid}")
  patches = jax.image.resize(jnp.asarray(patches.reshape(old, old, -1)),
                             grid + (patches.shape[-1],), method="bilinear")
  return np.concatenate([prefix, np.asarray(patches).reshape(1, -1, posemb.shape[-1])], axis=1)


def check_against(flat: Flat, expected: Flat) -> None:
  """Raises `CheckpointMismatchError` unless names and shapes match exactly."""
  missing = sorted(set(expected) - set(flat))
  unexpected = sorted(set(flat) - set(expected))
  mismatched = [f"{k}: checkpoint {tuple(flat[k].shape)} vs model {tuple(expected[k].shape)}"
                for k in sorted(set(flat) & set(expected))
                if tuple(flat[k].shape) != tuple(expected[k].shape)]
  if missing or unexpected or mismatched:
    lines = ["checkpoint does not match the model:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in items)
    raise CheckpointMismatchError("\n".join(lines))


def checked_params(flat: Flat, model_cfg: ml_collections.ConfigDict):
  """`(model_cfg, params)` from arrays in our layout: the config updated with the shape they hold,
  position embeddings resampled to the grid of `model_cfg.image_size`, names and shapes checked
  against the model (`CheckpointMismatchError`)."""
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  model_cfg.update(infer_shape(flat))
  grid = model_cfg.image_size // model_cfg.patch_size
  num_prefix = 1 if model_cfg.pool == "tok" else 0
  if formats.POSEMB in flat and flat[formats.POSEMB].shape[1] - num_prefix != grid * grid:
    flat = {**flat, formats.POSEMB: resample_posemb(flat[formats.POSEMB], num_prefix, (grid, grid))}
  model = build_model(model_cfg)
  dummy = jax.ShapeDtypeStruct((1, model_cfg.image_size, model_cfg.image_size,
                                model_cfg.channels), jnp.float32)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), dummy)["params"]
  check_against(flat, flax.traverse_util.flatten_dict(expected, sep="/"))
  params = flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")
  return model_cfg, params


def read_converted(path: str, num_heads) -> Tuple[Flat, str]:
  """`(arrays in our names and layouts, format)` of the checkpoint at `path`."""
  raw = read_flat(path)
  from clamp_jax.models.checkpoints.swin_timm import is_timm_swin  # it imports this module
  if is_timm_swin(raw):
    raise CheckpointError(f"{path}: a timm Swin checkpoint, but config.model is a ViT's: use a "
                          f"Swin config (family 'swin': configs/fmnist_swin.py, swin_t.py, ...)")
  check_floats(raw, path)
  fmt = formats.detect_format(raw, path)
  try:
    return formats.to_ours(raw, fmt, num_heads), fmt
  except ValueError as e:  # the arrays do not fit the format's layouts (or need num_heads)
    raise CheckpointError(f"{path}: {e}") from e


@contextlib.contextmanager
def _about(path: str):
  """Starts the message of a `CheckpointMismatchError` raised inside with `path`."""
  try:
    yield
  except CheckpointMismatchError as e:
    raise CheckpointMismatchError(f"{path}: {e}") from e


def with_file_fields(model_cfg: ml_collections.ConfigDict, flat: Flat, fmt: str, path: str,
                     pinned: Collection[str] = ()) -> ml_collections.ConfigDict:
  """A copy of `model_cfg` with the fields the file determines (see `load_checkpoint`)."""
  with _about(path):
    fields = {**infer_shape(flat), **formats.IMPLIED_FIELDS.get(fmt, {})}
  clashes = [f"config.model.{k}={model_cfg.get(k)!r} but the file holds {v!r}"
             for k, v in sorted(fields.items()) if k in pinned and model_cfg.get(k) != v]
  if clashes:
    raise CheckpointError(f"{path}: {'; '.join(clashes)} (drop the override: the file decides)")
  model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
  model_cfg.update(fields)
  return model_cfg


def file_model_config(path: str, model_cfg: ml_collections.ConfigDict,
                      pinned: Collection[str] = ()) -> ml_collections.ConfigDict:
  """The `model_cfg` that `load_checkpoint(path, model_cfg, pinned)` returns, without building
  the model."""
  if model_family(model_cfg) == "swin":
    from clamp_jax.models.checkpoints.swin_timm import swin_file_config  # it imports this module
    return swin_file_config(path, model_cfg, pinned)
  flat, fmt = read_converted(path, model_cfg.get("num_heads"))
  return with_file_fields(model_cfg, flat, fmt, path, pinned)


def load_checkpoint(path: str, model_cfg: ml_collections.ConfigDict,
                    pinned: Collection[str] = ()):
  """`(model_cfg, params)`: the config updated with what the file determines, and the params.

  The file decides its shape (patch size, channels, width, depth, MLP width, classes, pooling,
  pre-logits width, and `num_heads` where it stores them: vision_transformer and big_vision, not
  timm) and what its format implies (timm: exact GELU); `model_cfg`'s values for these are a
  preset's guess and are replaced. A field named in `pinned` is the user's word instead (the
  command line pins the fields it sets): if it differs from the file, `CheckpointError` names
  both values. What the file cannot hold (`num_heads` of timm files, the image size, LayerNorm
  epsilon, the GELU form of vision_transformer and big_vision files) comes from `model_cfg`.
  Position embeddings are resampled to the grid of `model_cfg.image_size`. A Swin config
  (`config.model.family` "swin") reads a timm Swin file (`swin_timm.load_swin_checkpoint`).
  """
  if model_family(model_cfg) == "swin":
    from clamp_jax.models.checkpoints.swin_timm import load_swin_checkpoint  # imports this module
    return load_swin_checkpoint(path, model_cfg, pinned)
  flat, fmt = read_converted(path, model_cfg.get("num_heads"))
  model_cfg = with_file_fields(model_cfg, flat, fmt, path, pinned)
  with _about(path):
    return checked_params(flat, model_cfg)
