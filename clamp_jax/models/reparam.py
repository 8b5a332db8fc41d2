"""RepQ-ViT's post-LayerNorm scale reparameterization, applied to a model's params.

Each quantized LayerNorm output (`ln1`, `ln2`) is calibrated per channel; the per-channel grids
are folded into the LayerNorm's scale/bias and the rows of the linears that read it
(`quant.reparam`), so at run time the site is quantized per tensor with the common grid. The
folded float model equals the original up to float error. `FOLDS` says, per site name, which
LayerNorm writes the site and which projections read it, relative to the site's module.

A Swin's patch-merging LayerNorm output (`merge_ln`) is not folded: its reduction has no bias to
absorb the shift `d` of the common grid (one would change the parameter tree timm files and the
export share); it is quantized per tensor from its observer like any other activation.
"""

from typing import Dict, Tuple

import flax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clamp_jax.models.quantized import calibrate, observe, site_rule
from clamp_jax.quant import reparam

# site name -> (LayerNorm writing it, projections reading it), paths relative to the site's module
FOLDS = {
    "ln1": ("LayerNorm_0", ("MultiHeadDotProductAttention_0/query",
                            "MultiHeadDotProductAttention_0/key",
                            "MultiHeadDotProductAttention_0/value")),
    "ln2": ("LayerNorm_1", ("MlpBlock_0/Dense_0",)),
}

Factors = Dict[str, Dict[str, np.ndarray]]  # site path -> {"r", "d", "scale", "zero_point"}


def reparam_factors(model, params, images, qcfg: ml_collections.ConfigDict) -> Factors:
  """Per-channel grids of every quantized, foldable LayerNorm output on `images`, and the common
  per-tensor grid each maps onto: `{site path: {r, d, scale, zero_point}}` (NumPy)."""
  factors = {}
  for path, x in observe(model, {"params": params}, images).items():
    rule = site_rule(path, qcfg)
    if path.rsplit("/", 1)[-1] not in FOLDS or rule is None or rule["quantizer"] != "uniform":
      continue
    scale_c, zero_point_c = reparam.channel_grids(x, jnp.asarray(rule["bits"], jnp.float32))
    r, d, scale, zero_point = reparam.common_grid(scale_c, zero_point_c)
    factors[path] = {k: np.asarray(v, np.float32) for k, v in
                     dict(r=r, d=d, scale=scale, zero_point=zero_point).items()}
  return factors


def fold(params, factors: Factors):
  """`params` with each factor folded into its LayerNorm and the projections reading it."""
  flat = {k: jnp.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/").items()}
  for path, f in factors.items():
    module, name = path.rsplit("/", 1)
    norm, linears = FOLDS[name]
    norm = f"{module}/{norm}"
    missing = [p for p in [f"{norm}/scale", f"{norm}/bias"] +
               [f"{module}/{l}/{w}" for l in linears for w in ("kernel", "bias")] if p not in flat]
    if missing:
      raise ValueError(f"cannot reparameterize {path}: the params lack {missing}")
    flat[f"{norm}/scale"], flat[f"{norm}/bias"] = reparam.fold_norm(
        flat[f"{norm}/scale"], flat[f"{norm}/bias"], f["r"], f["d"])
    for linear in linears:
      prefix = f"{module}/{linear}"
      flat[f"{prefix}/kernel"], flat[f"{prefix}/bias"] = reparam.fold_linear(
          flat[f"{prefix}/kernel"], flat[f"{prefix}/bias"], f["r"], f["d"])
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def calibrate_model(model, params, images, qcfg: ml_collections.ConfigDict
                    ) -> Tuple[dict, dict, Factors]:
  """`(params, qparams, factors)`: with `qcfg.reparam`, the LayerNorm outputs reparameterized
  (params folded, those sites on their common grid); otherwise the params as they are and
  `calibrate`'s QuantParams."""
  factors = reparam_factors(model, params, images, qcfg) if qcfg.reparam else {}
  params = fold(params, factors)
  grids = {path: (f["scale"], f["zero_point"]) for path, f in factors.items()}
  return params, calibrate(model, params, images, qcfg, grids), factors
