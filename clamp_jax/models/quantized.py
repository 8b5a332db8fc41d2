"""The quantized model (ViT or Swin): which quantizer each site gets (from `config.quant`), and
calibration.

Sites are the `quant_site` calls of `vit.py` and `swin.py`; `config.quant.sites` picks the
protocol:

- `matmul` (default): the literature's W4/A4 (RepQ-ViT, PTQ4ViT, ERQ, ...): every weight and the
  input of every matmul (LN outputs — a Swin's patch-merging LN `merge_ln` too —, q, k, v,
  softmax probabilities, attention x V, GELU output, the head's input, the image); the residual
  stream, LayerNorm and softmax inputs and the logits stay float. A Swin's relative position
  bias tables stay float parameters; its window-attention sites are per tensor like the rest.
- `all`: the paper's release (FQ-ViT based): every site, the residual stream at `residual_bits`.

Weights: asymmetric per output channel (the paper's `(max - min) / (2^b - 1)`); activations per
tensor. `export_integer` writes the model as integer kernels + scales; `load_quantized` reads it back.
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
from clamp_jax.models.checkpoints.swin_timm import checked_swin_params
from clamp_jax.models.presets import model_family
from clamp_jax.models.vit import OBSERVE
from clamp_jax.quant import observers
from clamp_jax.quant.export import from_int, to_int
from clamp_jax.quant.params import (ACTIVATION, LOG2, LOG_SQRT2, TWIN, UNIFORM, WEIGHT,
                                    SiteQuant, flatten, join, static_description, unflatten)
from clamp_jax.quant.twin import twin_uniform_scale

OBSERVERS = {"minmax": observers.minmax, "percentile": observers.percentile,
             "omse": observers.omse}
PROTOCOLS = ("matmul", "all")
SOFTMAX_QUANTIZERS = ("float", LOG2, LOG_SQRT2)
GELU_QUANTIZERS = (UNIFORM, TWIN)
# The residual stream: LayerNorm inputs (`merge_out`: a Swin's patch merging output).
LN_INPUT_SITES = ("posembed", "residual1", "residual2", "merge_out")
# The inputs of matmuls: the activation sites the `matmul` protocol quantizes.
MATMUL_INPUT_SITES = ("image", "ln1", "q", "k", "v", "attn_probs", "attn_v", "ln2", "gelu",
                      "merge_ln", "head_in", "pre_logits_out")
NOT_IN_ALL = ("head_in",)  # sites the `all` protocol (the paper's release) does not quantize
BUDGET_KINDS = ("size", "bops", "both")
MP_STARTS = ("lowered", "sensitivity", "trades")  # config.quant.mp_start
ACTIVATION_FIELDS = ("scale", "zero_point", "bits")  # what the export keeps of an activation site
SITES_KEY = "quant_sites.json"  # the export's entry of every site's static description


def quant_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.quant` section with its defaults, then `overrides`."""
  cfg = ml_collections.ConfigDict(dict(
      sites="matmul",       # protocol: "matmul" (the literature's) or "all" (the paper's release)
      w_bits=8, a_bits=8,
      first_layer_bits=0,   # patch embedding weights; 0: w_bits
      last_layer_bits=0,    # head weights; 0: w_bits
      image_bits=8,         # the input image; 0: float
      residual_bits=0,      # "all" only: the residual stream sites; 0: a_bits
      w_symmetric=False, a_symmetric=False,
      w_observer="minmax",
      a_observer="percentile",  # 99.99th percentile ranges: best start on held-in images (BENCHMARKS)
      softmax=LOG_SQRT2,    # attention probabilities: "log_sqrt2" (RepQ-ViT), "log2" (FQ-ViT), "float"
      softmax_bits=0,       # 0: a_bits
      gelu=UNIFORM,         # GELU output: "uniform" grid or "twin" (PTQ4ViT's twin-uniform)
      reparam=True,         # RepQ-ViT: per-channel LN-output grids folded into LN and next linear
      ptf=False, ptf_factors=3,  # "all" only: FQ-ViT power-of-two factors for LayerNorm inputs
      # Mixed precision (needs config.search.enabled): the search also mutates each block site's
      # bits by +-1 (probability bit_mutation_prob) within w_bits_min..w_bits_max (weights) or
      # a_bits_min..a_bits_max (activations); every kept candidate meets the budget, a fraction
      # of the uniform W{budget_w_bits}/A{budget_a_bits} model's size (params x w_bits), BOPs
      # (MACs x w_bits x a_bits) or both. The search starts from the preset's bits lowered into
      # the budget (mp_start="lowered") or from bits allocated by each site's measured
      # sensitivity (search/allocate.py): greedily from the lowest bits ("sensitivity") or by
      # one-bit trades from the preset's bits ("trades").
      mixed=False, w_bits_min=2, w_bits_max=8, a_bits_min=4, a_bits_max=8,
      bit_mutation_prob=0.2, budget=1.0, budget_kind="size", budget_w_bits=4, budget_a_bits=8,
      mp_start="lowered",
  ))
  cfg.update(overrides)
  return cfg


def _check_choice(qcfg, field, known):
  if qcfg[field] not in known:
    raise ValueError(f"config.quant.{field}={qcfg[field]!r}; known: {list(known)}")


def validate(qcfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible `config.quant` value."""
  for field in ("w_bits", "a_bits", "w_bits_min", "w_bits_max", "a_bits_min", "a_bits_max",
                "budget_w_bits", "budget_a_bits"):
    if not 2 <= qcfg[field] <= 16:
      raise ValueError(f"config.quant.{field}={qcfg[field]} must be between 2 and 16")
  for field in ("first_layer_bits", "last_layer_bits", "image_bits", "residual_bits",
                "softmax_bits"):
    if qcfg[field] and not 2 <= qcfg[field] <= 16:
      raise ValueError(f"config.quant.{field}={qcfg[field]} must be 0 (default) or 2..16")
  _check_choice(qcfg, "sites", PROTOCOLS)
  _check_choice(qcfg, "softmax", SOFTMAX_QUANTIZERS)
  _check_choice(qcfg, "gelu", GELU_QUANTIZERS)
  _check_choice(qcfg, "mp_start", MP_STARTS)
  for field in ("w_observer", "a_observer"):
    _check_choice(qcfg, field, sorted(OBSERVERS))
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
  if qcfg.ptf and qcfg.sites != "all":
    raise ValueError(f"config.quant.ptf=True quantizes LayerNorm inputs, which "
                     f"config.quant.sites={qcfg.sites!r} keeps float; use sites='all'")
  if qcfg.mixed and qcfg.ptf:
    raise ValueError("config.quant.ptf=True does not combine with config.quant.mixed=True")


def quantized_in(name: str, protocol: str) -> bool:
  """Whether activation site `name` is quantized by the protocol `config.quant.sites`."""
  return name in MATMUL_INPUT_SITES if protocol == "matmul" else name not in NOT_IN_ALL


def site_rule(path: str, qcfg: ml_collections.ConfigDict) -> Optional[dict]:
  """How site `path` is quantized: `dict(kind, bits, signed, quantizer, ptf, observer)`, or None
  (float)."""
  name = path.rsplit("/", 1)[-1]
  if name == "kernel":
    bits = qcfg.w_bits
    if path.startswith("embedding/") and qcfg.first_layer_bits:
      bits = qcfg.first_layer_bits
    if path.startswith("head/") and qcfg.last_layer_bits:
      bits = qcfg.last_layer_bits
    return dict(kind=WEIGHT, bits=bits, signed=qcfg.w_symmetric, quantizer=UNIFORM, ptf=False,
                observer=qcfg.w_observer)
  if not quantized_in(name, qcfg.sites):
    return None
  rule = dict(kind=ACTIVATION, bits=qcfg.a_bits, signed=qcfg.a_symmetric, quantizer=UNIFORM,
              ptf=False, observer=qcfg.a_observer)
  if name == "attn_probs":
    if qcfg.softmax == "float":
      return None
    return dict(rule, bits=qcfg.softmax_bits or qcfg.a_bits, signed=False,
                quantizer=qcfg.softmax)
  if name == "gelu":
    return dict(rule, quantizer=qcfg.gelu)
  if name == "image":
    return dict(rule, bits=qcfg.image_bits) if qcfg.image_bits else None
  if name in LN_INPUT_SITES:
    return dict(rule, bits=qcfg.residual_bits or qcfg.a_bits, ptf=qcfg.ptf)
  return rule


def observe(model: nn.Module, variables: dict, images: jax.Array) -> Dict[str, jax.Array]:
  """Every site's value on `images`: `{"Transformer/encoderblock_0/ln1": array, ...}`.

  With a `"quant"` collection in `variables`, values are observed in the quantized model.
  """
  _, state = model.apply(variables, images, mutable=[OBSERVE])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state[OBSERVE]), sep="/")
  return {path: values[0] for path, values in flat.items()}


def site_params(x: jax.Array, rule: dict, batch: int, qcfg: ml_collections.ConfigDict,
                grid: Optional[tuple] = None, weight_axes: tuple = (0,)) -> SiteQuant:
  """Calibrates one site on its observed value `x`; `grid` `(scale, zero_point)` is used as it
  is instead of the observer's (a reparameterized LayerNorm output's common grid). A weight's
  grid is per output channel: one per index of the axes other than `weight_axes`."""
  bits = jnp.asarray(rule["bits"], jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  static = dict(kind=rule["kind"], signed=rule["signed"], quantizer=rule["quantizer"],
                numel=int(x.size) if rule["kind"] == WEIGHT else int(x.size) // batch)
  if rule["quantizer"] == LOG2:
    return SiteQuant(jnp.ones(()), jnp.zeros(()), bits, **static)
  if rule["quantizer"] == LOG_SQRT2:  # the largest level: the largest probability seen
    return SiteQuant(jnp.maximum(jnp.max(x), observers.EPS), jnp.zeros(()), bits, **static)
  if rule["quantizer"] == TWIN:
    return SiteQuant(twin_uniform_scale(x, bits), jnp.zeros(()), bits, **static)
  if grid is not None:
    scale, zero_point = (jnp.asarray(v, jnp.float32) for v in grid)
    return SiteQuant(scale, zero_point, bits, **static)
  if rule["ptf"]:
    return SiteQuant(*observers.ptf(x, bits, qcfg.ptf_factors), bits, **static)
  reduce_axes = weight_axes if rule["kind"] == WEIGHT else None  # weights: per output channel
  scale, zero_point = OBSERVERS[rule["observer"]](x, bits, rule["signed"], reduce_axes)
  return SiteQuant(scale, zero_point, bits, **static)


def calibrate(model: nn.Module, params, images: jax.Array, qcfg: ml_collections.ConfigDict,
              grids: Optional[Dict[str, tuple]] = None) -> dict:
  """`QuantParams` for `model` from the float model's values on `images` (min-max by default);
  `grids` (`{site path: (scale, zero_point)}`) fixes those sites' grids."""
  validate(qcfg)
  grids = grids or {}
  sites = {}
  for path, x in observe(model, {"params": params}, images).items():
    rule = site_rule(path, qcfg)
    if rule is not None:
      sites[path] = site_params(x, rule, images.shape[0], qcfg, grids.get(path))
  return unflatten(sites)


def apply_quantized(model: nn.Module, params, qparams, images: jax.Array, **kwargs):
  """The quantized model's forward (the float model's when `qparams` is empty)."""
  return model.apply({"params": params, "quant": qparams}, images, **kwargs)


def export_integer(params, qparams) -> Dict[str, np.ndarray]:
  """Float params with each quantized kernel as int8 values (int4 within int8) + scale + zero point.

  `PATH/kernel` becomes `PATH/kernel.int` (the kernel's shape), `PATH/kernel.zero_point`,
  `PATH/kernel.scale` (per output channel) and `PATH/kernel.bits`; activation sites are stored
  as `quant/SITE.{scale,zero_point,bits}`; `quant_sites.json` (a string array) holds every site's
  static description (`{path: {kind, signed, quantizer, numel}}`). `load_quantized` reads it back.
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
  from the file and checked against the model (a ViT, or a Swin by `model_cfg.family`) as
  `load_checkpoint` does.
  """
  arrays = read_flat(path)
  qparams = _activation_sites(arrays, path)
  flat = _dequantized_flat(arrays)
  if model_family(model_cfg) == "swin":
    model_cfg, params = checked_swin_params(flat, model_cfg, path)
  else:
    model_cfg, params = checked_params(flat, model_cfg)
  return model_cfg, params, qparams
