"""Load a float checkpoint of any supported format into our ViT, reading its shape from the file."""

import os
import re
from typing import Dict, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clamp_jax.files import atomic_path
from clamp_jax.models.checkpoints import formats
from clamp_jax.models.presets import build_model

Flat = formats.Flat


class CheckpointMismatchError(ValueError):
  """The checkpoint does not fit the model: lists missing, unexpected and mis-shaped names."""


def read_flat(path: str) -> Flat:
  """All arrays of a `.npz` or `.safetensors` file, by name."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path} (config.model.checkpoint)")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    return dict(load_file(path))
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  raise ValueError(f"unsupported checkpoint file {path}: expected .npz or .safetensors")


def save_vit_npz(path: str, params) -> None:
  """Writes `params` as a vision_transformer `.npz` (flat `/`-joined names), atomically."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  with atomic_path(path) as tmp:
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})


def infer_shape(flat: Flat) -> Dict:
  """The model fields a checkpoint in our layout determines (not `num_heads` for timm)."""
  def need(key):
    if key not in flat:
      raise CheckpointMismatchError(f"checkpoint is missing {key!r}, needed to read the model shape")
    return flat[key].shape

  kh, _, channels, hidden = need("embedding/kernel")
  layers = {int(m.group(1)) for k in flat for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m}
  shape = dict(patch_size=int(kh), channels=int(channels), hidden_size=int(hidden),
               num_layers=len(layers), pool="tok" if "cls" in flat else "gap",
               num_classes=int(need("head/kernel")[-1]),
               mlp_dim=int(need("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel")[-1]),
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


def load_checkpoint(path: str, model_cfg: ml_collections.ConfigDict):
  """`(model_cfg, params)`: the config updated with the shape the file holds, and the params.

  What the file cannot hold (`num_heads` of timm files, the image size, LayerNorm epsilon,
  the GELU form) comes from `model_cfg`. Position embeddings are resampled to the grid of
  `model_cfg.image_size`.
  """
  raw = read_flat(path)
  fmt = formats.detect_format(raw, path)
  return checked_params(formats.to_ours(raw, fmt, model_cfg.get("num_heads")), model_cfg)
