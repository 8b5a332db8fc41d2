"""Serving a quantized export through qwix: its PTQ params (real int8 / int4 kernels) and rules.

`to_qwix(arrays, model, x)` turns `export_integer`'s arrays (a run's `quantized.npz`) into
qwix's PTQ params, every quantized kernel a `QArray` of int8 values (int4 at <= 4 bits) with the
export's own per-output-channel scales and zero points (none for a symmetric kernel), plus the
rules under which `qwix.quantize_model(model, qwix.PtqProvider(rules))` serves them:

    export = to_qwix(arrays, model, images)
    logits = qwix.quantize_model(model, qwix.PtqProvider(export.rules)).apply(
        {"params": export.params}, images)

Kernels dequantize exactly as ours do, `(q - zero_point) * scale`. With `activations=True` the
input of each kernel's matmul is quantized as well, by qwix's static scales filled with the
export's per-tensor scale and zero point, where qwix 0.1.8 can express the site: a uniform grid,
symmetric at 2..8 bits, or asymmetric at 4 or 8 bits entering a symmetric kernel (qwix refuses
two asymmetric operands in one matmul). The other quantized activation sites stay float, each
named with its reason in `float_sites`. qwix is imported on use: `weight_bytes`, which
`pipeline.finish` reports, does not need it.
"""

import json
import re
from typing import Dict, List, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

from clamp_jax.models.quantized import MATMUL_INPUT_SITES, SITES_KEY
from clamp_jax.quant.params import ACTIVATION, UNIFORM
from clamp_jax.search.budget import matmul_input

ATTENTION_SITES = ("q", "k", "v", "attn_probs")


class QwixExport(NamedTuple):
  """`rules` for `qwix.PtqProvider`, the PTQ `params` it serves, and `float_sites`:
  `{activation site: why it stays float}` for every quantized activation site not served."""
  rules: List
  params: dict
  float_sites: Dict[str, str]


def _import_qwix():
  try:
    import qwix
  except ImportError as e:
    raise ImportError("serving through qwix needs it: pip install qwix==0.1.8 "
                      "(or pip install '.[test]')") from e
  return qwix


def _storage(bits) -> jnp.dtype:
  """The integer type of a `bits`-bit kernel: int4 up to 4 bits, int8 above."""
  return jnp.int4 if int(bits) <= 4 else jnp.int8


def _static(arrays) -> dict:
  """Every site's static description, `{path: {kind, signed, quantizer, numel}}`."""
  return json.loads(arrays[SITES_KEY].item())


def _kernels(arrays) -> Dict[str, bool]:
  """`{kernel path: signed}` of the export's quantized kernels."""
  static = _static(arrays)
  return {key[:-len(".int")]: static[key[:-len(".int")]]["signed"] for key in arrays
          if key.endswith(".int") and not key.startswith("quant/")}


def weight_bytes(arrays) -> Dict[str, int]:
  """`{"float", "quantized"}`: bytes of the export's parameters in float32, and as `to_qwix`
  holds them (weights only): kernels at 4 or 8 bits (int4 packed, two values a byte), float32
  scales, zero points of asymmetric kernels at the kernel's width, every other parameter float32."""
  total = {"float": 0, "quantized": 0}
  for key, value in arrays.items():
    if "." not in key:  # a float parameter
      total["float"] += value.nbytes
      total["quantized"] += value.nbytes
  for path, signed in _kernels(arrays).items():
    width = jnp.iinfo(_storage(arrays[f"{path}.bits"])).bits
    ints = arrays[f"{path}.int"].size + (0 if signed else arrays[f"{path}.zero_point"].size)
    total["float"] += 4 * arrays[f"{path}.int"].size
    total["quantized"] += -(-ints * width // 8) + arrays[f"{path}.scale"].nbytes
  return total


def _act_qtype(bits: int, signed: bool):
  """qwix's type of an activation grid: int8, int4, or (symmetric only) "intN"; None where qwix
  has no asymmetric grid of that width."""
  if bits in (4, 8):
    return jnp.int4 if bits == 4 else jnp.int8
  return f"int{bits}" if signed else None


def _why_float(arrays, kernels: Dict[str, bool], site: str, meta: dict, entered: List[str]):
  """Why qwix cannot quantize activation `site` entering the matmuls of `entered` (of
  `kernels`) as the export does, or None where it can."""
  bits = int(arrays[f"quant/{site}.bits"])
  if site.rsplit("/", 1)[-1] in ATTENTION_SITES:
    return ("an operand of the attention's activation x activation matmuls: one qwix rule "
            "quantizes both einsums of the attention module alike, and the softmax grid is not "
            "uniform")
  if not entered:
    return "is no kernel's direct matmul input; qwix quantizes matmul operands only"
  if meta["quantizer"] != UNIFORM:
    return f"a {meta['quantizer']} grid; qwix's grids are uniform"
  if _act_qtype(bits, meta["signed"]) is None:
    return f"asymmetric at {bits} bits; qwix's asymmetric grids are int4 and int8"
  for path in entered:
    if not (meta["signed"] or kernels[path]):
      return (f"asymmetric, entering the asymmetric {path}: qwix 0.1.8 takes one asymmetric "
              "operand per matmul")
    if _storage(bits) == _storage(arrays[f"{path}.bits"]) == jnp.int4:
      return (f"int4, entering the int4 {path}: XLA's CPU and GPU backends do not compile an "
              "int4 x int4 matmul")
  return None


def _served_inputs(arrays, activations: bool):
  """`({kernel path: its input site, quantized by qwix}, {site: why it stays float})`."""
  sites = {path: meta for path, meta in _static(arrays).items() if meta["kind"] == ACTIVATION}
  kernels, entered = _kernels(arrays), {}  # entered: site -> kernels it is the direct input of
  for path in kernels:
    found = matmul_input(path, sites)
    if found and found[0].rsplit("/", 1)[-1] in MATMUL_INPUT_SITES:
      entered.setdefault(found[0], []).append(path)
  why = {site: _why_float(arrays, kernels, site, meta, entered.get(site, [])) if activations
         else "activations=False" for site, meta in sites.items()}
  served = {path: site for site, paths in entered.items() if why[site] is None for path in paths}
  return served, {site: reason for site, reason in why.items() if reason}


def qwix_rules(arrays, activations: bool = False) -> List:
  """One `qwix.QuantizationRule` per quantized kernel's module: the kernel's type and, with
  `activations`, its input's static grid where qwix can express it."""
  qwix = _import_qwix()
  served, _ = _served_inputs(arrays, activations)
  static, rules = _static(arrays), []
  for path, signed in _kernels(arrays).items():
    act = {}
    if path in served:
      site = served[path]
      a_signed = static[site]["signed"]
      act = dict(act_qtype=_act_qtype(int(arrays[f"quant/{site}.bits"]), a_signed),
                 act_static_scale=True, act_calibration_method="absmax" if a_signed else "minmax")
    rules.append(qwix.QuantizationRule(
        module_path=re.escape(path.rsplit("/", 1)[0]),
        weight_qtype=_storage(arrays[f"{path}.bits"]),
        weight_calibration_method="absmax" if signed else "minmax", **act))
  return rules


def _fits(values, dtype) -> jax.Array:
  """`values` (int8) as `dtype`; raises where one does not fit."""
  out = jnp.asarray(values).astype(dtype)
  if not np.array_equal(np.asarray(out.astype(jnp.int8)), values):
    raise ValueError(f"values outside {jnp.dtype(dtype).name}: {np.unique(values)}")
  return out


def to_qwix(arrays, model, x, activations: bool = False) -> QwixExport:
  """The qwix PTQ export of `export_integer`'s `arrays` for `model` (a ViT or Swin built from the
  export's model config) on inputs shaped like `x` (only its shape is used)."""
  qwix = _import_qwix()
  rules = qwix_rules(arrays, activations)
  served, float_sites = _served_inputs(arrays, activations)
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(qmodel.init, jax.random.PRNGKey(0), x)["params"]
  params = {}
  for key, leaf in flax.traverse_util.flatten_dict(abstract, sep="/").items():
    module, _, name = key.rpartition("/")
    if key in arrays:  # a float parameter
      params[key] = jnp.asarray(arrays[key])
    elif f"{key}.int" in arrays:  # a kernel: our integers, scale and zero point
      like = leaf.array
      q = _fits(arrays[f"{key}.int"], like.qvalue.dtype)
      zp = None if like.zero_point is None else _fits(
          np.reshape(arrays[f"{key}.zero_point"], like.zero_point.shape), like.qvalue.dtype)
      scale = jnp.reshape(jnp.asarray(arrays[f"{key}.scale"], jnp.float32), like.scale.shape)
      params[key] = leaf.replace(array=qwix.QArray(q, scale, zp, like.qtype))
    elif name.endswith(("_lhs_scale", "_lhs_zero_point")):  # the input's static grid
      site = served[f"{module}/kernel"]
      bits = arrays[f"quant/{site}.bits"]
      if name.endswith("_scale"):
        params[key] = leaf.replace(array=jnp.full(leaf.array.shape, arrays[f"quant/{site}.scale"],
                                                  jnp.float32))
      else:  # our unsigned grid [0, 2^b - 1] shifted onto qwix's signed one, as export.to_int does
        zp = np.asarray(arrays[f"quant/{site}.zero_point"]) - 2.0 ** (bits - 1)
        params[key] = jnp.full(leaf.shape, zp, leaf.dtype)
    else:
      raise ValueError(f"qwix's {key} has no counterpart in the export")
  return QwixExport(rules, flax.traverse_util.unflatten_dict(params, sep="/"), float_sites)
