"""The quantized ViT: which quantizer each site gets (from `config.quant`), and calibration.

Sites are the `quant_site` calls of `vit.py`. Weights: asymmetric per output channel
(the paper's `(max - min) / (2^b - 1)`), activations per tensor; softmax and LayerNorm
stay in float unless `softmax_log2` / `ptf` ask otherwise. `export_integer` writes the model as
integer kernels + scales; `load_quantized` reads it back.
"""

import json
from typing import Dict, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clamp_jax.models.checkpoints.loader import checked_params, read_flat
from clamp_jax.models.vit import OBSERVE
from clamp_jax.quant import observers
from clamp_jax.quant.export import from_int, to_int
from clamp_jax.quant.params import (ACTIVATION, WEIGHT, SiteQuant, flatten, join,
                                    static_description, unflatten)

OBSERVERS = {"minmax": observers.minmax, "percentile": observers.percentile,
             "omse": observers.omse}
LN_INPUT_SITES = ("posembed", "residual1", "residual2")  # the values LayerNorms read
BUDGET_KINDS = ("size", "bops", "both")
ACTIVATION_FIELDS = ("scale", "zero_point", "bits")  # what the export keeps of an activation site
SITES_KEY = "quant_sites.json"  # the export's entry of every site's static description


def quant_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.quant` section with its defaults, then `overrides`."""
  cfg = ml_collections.ConfigDict(dict(
      w_bits=8, a_bits=8,
      first_layer_bits=0,   # patch embedding weights; 0: w_bits
      last_layer_bits=0,    # head weights; 0: w_bits
      image_bits=8,         # the input image; 0: float
      w_symmetric=False, a_symmetric=False,
      w_observer="minmax", a_observer="minmax",
      softmax_log2=False, softmax_bits=4,  # FQ-ViT log2 quantizer for attention probabilities
      ptf=False, ptf_factors=3,            # FQ-ViT power-of-two factors for LayerNorm inputs
      # Mixed precision (needs config.search.enabled): the search also mutates each block site's
      # bits by +-1 (probability bit_mutation_prob) within w_bits_min..w_bits_max (weights) or
      # a_bits_min..a_bits_max (activations); every kept candidate meets the budget, a fraction
      # of the uniform W4/A8 model's size (params x w_bits), BOPs (MACs x w_bits x a_bits) or both.
      mixed=False, w_bits_min=2, w_bits_max=8, a_bits_min=4, a_bits_max=8,
      bit_mutation_prob=0.2, budget=1.0, budget_kind="size",
  ))
  cfg.update(overrides)
  return cfg


def validate(qcfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible `config.quant` value."""
  for field in ("w_bits", "a_bits", "softmax_bits", "w_bits_min", "w_bits_max", "a_bits_min",
                "a_bits_max"):
    if not 2 <= qcfg[field] <= 16:
      raise ValueError(f"config.quant.{field}={qcfg[field]} must be between 2 and 16")
  for field in ("first_layer_bits", "last_layer_bits", "image_bits"):
    if qcfg[field] and not 2 <= qcfg[field] <= 16:
      raise ValueError(f"config.quant.{field}={qcfg[field]} must be 0 (default) or 2..16")
  for field in ("w_observer", "a_observer"):
    if qcfg[field] not in OBSERVERS:
      raise ValueError(f"config.quant.{field}={qcfg[field]!r}; known: {sorted(OBSERVERS)}")
  for kind in ("w", "a"):
    low, high = qcfg[f"{kind}_bits_min"], qcfg[f"{kind}_bits_max"]
    if low > high:
      raise ValueError(f"config.quant.{kind}_bits_min={low} exceeds "
                       f"config.quant.{kind}_bits_max={high}")
    if qcfg.mixed and not low <= qcfg[f"{kind}_bits"] <= high:
      raise ValueError(f"config.quant.{kind}_bits={qcfg[f'{kind}_bits']} must lie in "
                       f"{kind}_bits_min..{kind}_bits_max ({low}..{high}) with mixed precision")
  if not 0.0 <= qcfg.bit_mutation_prob <= 1.0:
    raise ValueError(f"config.quant.bit_mutation_prob={qcfg.bit_mutation_prob} must lie in [0, 1]")
  if qcfg.budget <= 0:
    raise ValueError(f"config.quant.budget={qcfg.budget} must be positive")
  if qcfg.budget_kind not in BUDGET_KINDS:
    raise ValueError(f"config.quant.budget_kind={qcfg.budget_kind!r}; known: {BUDGET_KINDS}")
  if qcfg.mixed and qcfg.ptf:
    raise ValueError("config.quant.ptf=True does not combine with config.quant.mixed=True")


def site_rule(path: str, qcfg: ml_collections.ConfigDict) -> Optional[dict]:
  """How site `path` is quantized: `dict(kind, bits, signed, log2, ptf, observer)`, or None (float)."""
  name = path.rsplit("/", 1)[-1]
  if name == "kernel":
    bits = qcfg.w_bits
    if path.startswith("embedding/") and qcfg.first_layer_bits:
      bits = qcfg.first_layer_bits
    if path.startswith("head/") and qcfg.last_layer_bits:
      bits = qcfg.last_layer_bits
    return dict(kind=WEIGHT, bits=bits, signed=qcfg.w_symmetric, log2=False, ptf=False,
                observer=qcfg.w_observer)
  if name == "attn_probs":
    if not qcfg.softmax_log2:
      return None
    return dict(kind=ACTIVATION, bits=qcfg.softmax_bits, signed=False, log2=True, ptf=False,
                observer=None)
  bits = qcfg.a_bits
  if name == "image":
    if not qcfg.image_bits:
      return None
    bits = qcfg.image_bits
  return dict(kind=ACTIVATION, bits=bits, signed=qcfg.a_symmetric, log2=False,
              ptf=qcfg.ptf and name in LN_INPUT_SITES, observer=qcfg.a_observer)


def observe(model: nn.Module, variables: dict, images: jax.Array) -> Dict[str, jax.Array]:
  """Every site's value on `images`: `{"Transformer/encoderblock_0/ln1": array, ...}`.

  With a `"quant"` collection in `variables`, values are observed in the quantized model.
  """
  _, state = model.apply(variables, images, mutable=[OBSERVE])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state[OBSERVE]), sep="/")
  return {path: values[0] for path, values in flat.items()}


def site_params(x: jax.Array, rule: dict, batch: int, qcfg: ml_collections.ConfigDict) -> SiteQuant:
  """Calibrates one site on its observed value `x`."""
  bits = jnp.asarray(rule["bits"], jnp.float32)
  static = dict(kind=rule["kind"], signed=rule["signed"], log2=rule["log2"],
                numel=int(x.size) if rule["kind"] == WEIGHT else int(x.size) // batch)
  if rule["log2"]:
    return SiteQuant(jnp.ones(()), jnp.zeros(()), bits, **static)
  if rule["ptf"]:
    return SiteQuant(*observers.ptf(x, bits, qcfg.ptf_factors), bits, **static)
  reduce_axes = (0,) if rule["kind"] == WEIGHT else None  # weights: per output channel
  scale, zero_point = OBSERVERS[rule["observer"]](x, bits, rule["signed"], reduce_axes)
  lo, hi = observers.minmax_range(jnp.asarray(x, jnp.float32), reduce_axes)
  return SiteQuant(scale, zero_point, bits, **static, lo=lo, hi=hi)


def calibrate(model: nn.Module, params, images: jax.Array,
              qcfg: ml_collections.ConfigDict) -> dict:
  """`QuantParams` for `model` from the float model's values on `images` (min-max by default)."""
  validate(qcfg)
  sites = {}
  for path, x in observe(model, {"params": params}, images).items():
    rule = site_rule(path, qcfg)
    if rule is not None:
      sites[path] = site_params(x, rule, images.shape[0], qcfg)
  return unflatten(sites)


def apply_quantized(model: nn.Module, params, qparams, images: jax.Array, **kwargs):
  """The quantized model's forward (the float model's when `qparams` is empty)."""
  return model.apply({"params": params, "quant": qparams}, images, **kwargs)


def export_integer(params, qparams) -> Dict[str, np.ndarray]:
  """Float params with each quantized kernel as int8 values (int4 within int8) + scale + zero point.

  `PATH/kernel` becomes `PATH/kernel.int` (the kernel's shape), `PATH/kernel.zero_point`,
  `PATH/kernel.scale` (per output channel) and `PATH/kernel.bits`; activation sites are stored
  as `quant/SITE.{scale,zero_point,bits}`; `quant_sites.json` (a string array) holds every site's
  static description (`{path: {kind, signed, log2, numel}}`). `load_quantized` reads it back.
  """
  arrays = {k: np.asarray(v) for k, v in
            flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/").items()}
  sites = flatten(qparams)
  for path, site in sites.items():
    if site.kind == WEIGHT:
      kernel = arrays.pop(path)
      q, zp = to_int(kernel.reshape(-1, site.scale.shape[-1]), site.scale, site.zero_point,
                     site.bits, site.signed)
      arrays[f"{path}.int"] = np.asarray(q).reshape(kernel.shape)
      arrays[f"{path}.zero_point"] = np.asarray(zp)
    for field in ("scale", "bits") if site.kind == WEIGHT else ACTIVATION_FIELDS:
      prefix = path if site.kind == WEIGHT else f"quant/{path}"
      arrays[f"{prefix}.{field}"] = np.asarray(getattr(site, field))
  static = {path: static_description(site) for path, site in sites.items()}
  arrays[SITES_KEY] = np.array(json.dumps(static, sort_keys=True))
  return arrays


def _dequantized_flat(arrays: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
  """`export_integer`'s float params and dequantized kernels, by `/`-joined name."""
  flat = {}
  for key, value in arrays.items():
    if key.endswith(".int") and not key.startswith("quant/"):
      path = key[:-len(".int")]
      scale = arrays[f"{path}.scale"]
      kernel = from_int(value.reshape(-1, scale.shape[-1]), arrays[f"{path}.zero_point"], scale)
      flat[path] = jnp.reshape(kernel, value.shape)
    elif "." not in key:  # a float parameter, stored as it was
      flat[key] = jnp.asarray(value)
  return flat


def dequantized_params(arrays: Dict[str, np.ndarray]):
  """Float params from `export_integer`'s arrays, each kernel dequantized from its integers."""
  return flax.traverse_util.unflatten_dict(_dequantized_flat(arrays), sep="/")


def _activation_sites(arrays: Dict[str, np.ndarray], path: str) -> dict:
  """The `QuantParams` of the activation sites in `export_integer`'s arrays, read from `path`."""
  if SITES_KEY not in arrays:
    raise ValueError(f"{path} is not a clamp_jax quantized export: it has no {SITES_KEY!r} "
                     "(written by export_integer); a float checkpoint loads with load_checkpoint")
  static = {site: meta for site, meta in json.loads(arrays[SITES_KEY].item()).items()
            if meta["kind"] == ACTIVATION}
  missing = [f"quant/{site}.{field}" for site in static for field in ACTIVATION_FIELDS
             if f"quant/{site}.{field}" not in arrays]
  if missing:
    raise ValueError(f"{path} lacks arrays of activation sites listed in {SITES_KEY}: {missing}")
  return join({site: {field: arrays[f"quant/{site}.{field}"] for field in ACTIVATION_FIELDS}
               for site in static}, static)


def load_quantized(path: str, model_cfg: ml_collections.ConfigDict):
  """`(model_cfg, params, qparams)` of a `.npz` of `export_integer`'s arrays.

  Kernels come back dequantized in `params` and `qparams` holds the activation sites only. That
  is exactly the exported model: `from_int(to_int(w)) == fake_quant(w)` and fake quantization is
  idempotent, so a weight site would leave the dequantized kernel unchanged. The shape is read
  from the file and checked against the model as `load_checkpoint` does.
  """
  arrays = read_flat(path)
  qparams = _activation_sites(arrays, path)
  model_cfg, params = checked_params(_dequantized_flat(arrays), model_cfg)
  return model_cfg, params, qparams
