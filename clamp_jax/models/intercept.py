"""Quantize a flax.linen model we did not write, without editing it (`nn.intercept_methods`).

The `Dense`, `DenseGeneral`, `Conv` and `Einsum` layers of any linen model get their input
fake-quantized per tensor and their kernel per output channel. Per-layer `Rule`s are matched
by a regex on the module path (`"Transformer/encoderblock_0/MlpBlock_0/Dense_0"`), first
match wins; a layer no rule matches stays float, and rules that matched nothing are reported.

    rules = [Rule(r"head$", w_bits=8, a_bits=8), Rule(r".*", w_bits=4, a_bits=8)]
    qparams, report = calibrate_layers(model, variables, rules, images)
    logits = apply_quantized_layers(model, variables, qparams, images)
"""

import dataclasses
import re
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from clamp_jax.quant import observers
from clamp_jax.quant.params import ACTIVATION, WEIGHT, SiteQuant

LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)


@dataclasses.dataclass(frozen=True)
class Rule:
  """Layers whose path matches `pattern` (re.search) get these bit widths; 0 keeps that part float."""
  pattern: str
  w_bits: int = 8
  a_bits: int = 8
  w_symmetric: bool = False
  a_symmetric: bool = False


@dataclasses.dataclass
class Report:
  """Which rule each quantized layer matched, the layers left float, and unused rules."""
  matched: Dict[str, str]
  unmatched_layers: List[str]
  unused_rules: List[str]


_INSIDE = threading.local()  # set while a layer is re-run with quantized params


def _layer_path(module: nn.Module) -> str:
  return "/".join(str(p) for p in module.path)


def kernel_reduce_axes(module: nn.Module, kernel: jax.Array, args: Sequence[Any]) -> Tuple[int, ...]:
  """The kernel axes that are not output channels (reduced over for per-channel scales)."""
  if isinstance(module, nn.Einsum):
    equation = (args[1] if len(args) > 1 and args[1] else module.einsum_str).replace(" ", "")
    operands, output = equation.split("->")
    kernel_letters = operands.split(",")[1]
    return tuple(i for i, c in enumerate(kernel_letters) if c not in output)
  if isinstance(module, nn.DenseGeneral):
    features = module.features if isinstance(module.features, Sequence) else (module.features,)
    return tuple(range(kernel.ndim - len(features)))
  return tuple(range(kernel.ndim - 1))  # Dense (in, out), Conv (..., in, out)


def _match(path: str, rules: Sequence[Rule]) -> Optional[Rule]:
  return next((r for r in rules if re.search(r.pattern, path)), None)


def _rerun(module: nn.Module, params: dict, args, kwargs):
  """Runs the layer's own `__call__` with `params` in place of its variables."""
  _INSIDE.active = True
  try:
    return module.clone(parent=None).apply({"params": params}, *args, **kwargs)
  finally:
    _INSIDE.active = False


def _interceptor(on_layer: Callable):
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (getattr(_INSIDE, "active", False) or context.method_name != "__call__"
        or not isinstance(module, LAYER_TYPES) or not module.has_variable("params", "kernel")):
      return next_fun(*args, **kwargs)
    return on_layer(next_fun, module, args, kwargs)
  return intercept


def calibrate_layers(model: nn.Module, variables: dict, rules: Sequence[Rule], *args,
                     **kwargs) -> Tuple[dict, Report]:
  """Min-max `{layer_path: {"input": SiteQuant, "kernel": SiteQuant}}` from one float forward."""
  sites, report = {}, Report({}, [], [])

  def on_layer(next_fun, module, call_args, call_kwargs):
    path = _layer_path(module)
    rule = _match(path, rules)
    if rule is None:
      report.unmatched_layers.append(path)
      return next_fun(*call_args, **call_kwargs)
    report.matched[path] = rule.pattern
    entry = {}
    if rule.a_bits:
      x, bits = call_args[0], jnp.asarray(rule.a_bits, jnp.float32)
      scale, zp = observers.minmax(x, bits, rule.a_symmetric)
      entry["input"] = SiteQuant(scale, zp, bits, kind=ACTIVATION, signed=rule.a_symmetric,
                                 numel=int(x.size) // max(int(x.shape[0]), 1))
    if rule.w_bits:
      kernel, bits = module.get_variable("params", "kernel"), jnp.asarray(rule.w_bits, jnp.float32)
      scale, zp = observers.minmax(kernel, bits, rule.w_symmetric,
                                   kernel_reduce_axes(module, kernel, call_args))
      entry["kernel"] = SiteQuant(scale, zp, bits, kind=WEIGHT, signed=rule.w_symmetric,
                                  numel=int(kernel.size))
    if entry:
      sites[path] = entry
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(_interceptor(on_layer)):
    model.apply(variables, *args, **kwargs)
  report.unused_rules = [r.pattern for r in rules if r.pattern not in report.matched.values()]
  for pattern in report.unused_rules:
    logging.warning("quantization rule %r matched no Dense/DenseGeneral/Conv/Einsum layer", pattern)
  return sites, report


def apply_quantized_layers(model: nn.Module, variables: dict, qparams: dict, *args, **kwargs):
  """`model.apply(variables, *args, **kwargs)` with the layers of `qparams` fake-quantized."""
  def on_layer(next_fun, module, call_args, call_kwargs):
    entry = qparams.get(_layer_path(module))
    if entry is None:
      return next_fun(*call_args, **call_kwargs)
    params = dict(module.variables["params"])
    if "kernel" in entry:
      params["kernel"] = entry["kernel"](params["kernel"])
    if "input" in entry:
      call_args = (entry["input"](call_args[0]),) + tuple(call_args[1:])
    return _rerun(module, params, call_args, call_kwargs)

  with nn.intercept_methods(_interceptor(on_layer)):
    return model.apply(variables, *args, **kwargs)
