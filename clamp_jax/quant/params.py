"""`SiteQuant`: one quantization site's parameters, and `QuantParams` trees of them.

A `QuantParams` is a nested dict laid out like a Flax variable collection (module path ->
site name -> `SiteQuant`), passed to a model as its `"quant"` collection. Arrays
(`scale`, `zero_point`, `bits`) are pytree leaves, so `jit`
compiles one program for any values and `vmap` runs a population of them; the static
description (kind, signedness, quantizer, element count) is pytree metadata, kept apart from the
arrays.
"""

import json
import os
from typing import Callable, Dict, Iterator, Optional, Tuple

import flax
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from clamp_jax.files import write_json
from clamp_jax.quant.log2 import log2_fake_quant, log_sqrt2_fake_quant
from clamp_jax.quant.twin import twin_uniform_fake_quant
from clamp_jax.quant.uniform import fake_quant

WEIGHT, ACTIVATION = "weight", "activation"
# A site's quantizer: the affine grid (scale, zero point), FQ-ViT's log2 (no parameter),
# RepQ-ViT's log-sqrt(2) (`scale` is its largest level, Delta) or PTQ4ViT's twin-uniform
# (`scale` is the step of the non-negative side).
UNIFORM, LOG2, LOG_SQRT2, TWIN = "uniform", "log2", "log_sqrt2", "twin"
QUANTIZERS = (UNIFORM, LOG2, LOG_SQRT2, TWIN)
ARRAYS = ("scale", "zero_point", "bits")  # a `SiteQuant`'s array fields


@struct.dataclass
class SiteQuant:
  """Parameters of one site. `scale`/`zero_point` broadcast against the value quantized."""
  scale: jax.Array
  zero_point: jax.Array
  bits: jax.Array
  kind: str = struct.field(pytree_node=False, default=ACTIVATION)
  signed: bool = struct.field(pytree_node=False, default=False)
  quantizer: str = struct.field(pytree_node=False, default=UNIFORM)
  numel: int = struct.field(pytree_node=False, default=0)  # params, or activations per image
  # The bits mixed precision may give the site, `(low, high)` inclusive; None: the strategy's range
  # for the site's kind (a block site of our models). A foreign model's sites carry their rule's
  # (`models.intercept.Rule`). Not saved by `split`: only the search reads it.
  bit_range: Optional[Tuple[int, int]] = struct.field(pytree_node=False, default=None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Fake-quantizes `x` (straight-through gradient)."""
    if self.quantizer == LOG2:
      return log2_fake_quant(x, self.bits)
    if self.quantizer == LOG_SQRT2:
      return log_sqrt2_fake_quant(x, self.bits, self.scale)
    if self.quantizer == TWIN:
      return twin_uniform_fake_quant(x, self.scale, self.bits)
    return fake_quant(x, self.scale, self.zero_point, self.bits, self.signed)

  @property
  def uniform(self) -> bool:
    """Whether the site is an affine grid (whose bits mixed precision may move)."""
    return self.quantizer == UNIFORM

  @property
  def has_scale(self) -> bool:
    """Whether `scale` means something (every quantizer but log2)."""
    return self.quantizer != LOG2


def is_site(node) -> bool:
  return isinstance(node, SiteQuant)


def flatten(qparams) -> Dict[str, SiteQuant]:
  """`{"Transformer/encoderblock_0/ln1": SiteQuant, ...}`."""
  return {"/".join(path): site for path, site in flax.traverse_util.flatten_dict(
      flax.core.unfreeze(qparams), is_leaf=lambda _, node: is_site(node)).items()}


def unflatten(sites: Dict[str, SiteQuant]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in sites.items()})


def replace_sites(qparams, fn: Callable[[str, SiteQuant], SiteQuant]) -> dict:
  """`qparams` with each site replaced by `fn(path, site)`."""
  return unflatten({path: fn(path, site) for path, site in flatten(qparams).items()})


def iter_sites(qparams, kind: str = "") -> Iterator[Tuple[str, SiteQuant]]:
  """`(path, site)` pairs, optionally only those of `kind`."""
  for path, site in flatten(qparams).items():
    if not kind or site.kind == kind:
      yield path, site


def bit_summary(qparams) -> dict:
  """Plain and weighted average bit widths of weights (by parameters) and activations (by elements)."""
  out = {}
  for prefix, kind in (("w", WEIGHT), ("a", ACTIVATION)):
    sites = [s for _, s in iter_sites(qparams, kind)]
    bits = np.array([float(np.mean(s.bits)) for s in sites])
    sizes = np.array([s.numel for s in sites], np.float64)
    out[f"{prefix}_bits"] = float(bits.mean()) if len(bits) else 32.0
    out[f"{prefix}_bits_weighted"] = float((bits * sizes).sum() / sizes.sum()) if len(bits) else 32.0
    out[f"{prefix}_sites"] = len(sites)
  return out


def static_description(site: SiteQuant) -> dict:
  """What a site is, apart from its arrays: `{kind, signed, quantizer, numel}`."""
  return dict(kind=site.kind, signed=site.signed, quantizer=site.quantizer, numel=site.numel)


def split(qparams) -> Tuple[dict, dict]:
  """`(arrays, static)` by site path: its arrays (NumPy) and its static description, e.g. for a
  checkpoint of arrays beside a JSON file."""
  sites = flatten(qparams)
  arrays = {path: {field: np.asarray(getattr(s, field)) for field in ARRAYS}
            for path, s in sites.items()}
  return arrays, {path: static_description(s) for path, s in sites.items()}


def join(arrays: dict, static: dict) -> dict:
  """The `QuantParams` that `split` took apart (other arrays, e.g. the observed ranges that
  checkpoints before 2026-11-27 hold, are ignored)."""
  return unflatten({path: SiteQuant(**{f: jnp.asarray(arrays[path][f]) for f in ARRAYS},
                                    **meta) for path, meta in static.items()})


def save(directory: str, qparams) -> None:
  """Writes the arrays with orbax and the static description as `sites.json`, beside each other."""
  arrays, static = split(qparams)
  directory = os.path.abspath(directory)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, "arrays"), arrays, force=True)
  write_json(os.path.join(directory, "sites.json"), static)


def restore(directory: str) -> dict:
  """The `QuantParams` written by `save`."""
  directory = os.path.abspath(directory)
  with open(os.path.join(directory, "sites.json")) as f:
    static = json.load(f)
  with ocp.StandardCheckpointer() as checkpointer:
    arrays = checkpointer.restore(os.path.join(directory, "arrays"))
  return join(arrays, static)
