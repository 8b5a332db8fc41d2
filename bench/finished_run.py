"""A finished run's workdir as the bench scripts read it: the config launch.py recorded there
(`config.json`) and its quantized export (`quantized.npz`)."""

import json
import os

import ml_collections

from clamp_jax.models.quantized import load_quantized


def run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config `workdir`'s run recorded."""
  with open(os.path.join(workdir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_export(workdir: str, config: ml_collections.ConfigDict):
  """`(model config, float params, QuantParams)` of `workdir`'s export."""
  return load_quantized(os.path.join(workdir, "quantized.npz"), config.model)
