"""Quantize a flax.linen model we did not write, without editing it (`nn.intercept_methods`).

The `Dense`, `DenseGeneral`, `Conv` and `Einsum` layers of any linen model get their input
fake-quantized per tensor and their kernel per output channel. Per-layer `Rule`s are matched
by a regex on the module path (`"Transformer/encoderblock_0/MlpBlock_0/Dense_0"`), first
match wins; a layer no rule matches stays float, and rules that matched nothing are reported.

Activation x activation matmuls (attention's q x k and probabilities x v, in flax's
`dot_product_attention`, HuggingFace's and big_vision's ViTs) are quantized too: while the
model runs in `calibrate_layers` / `apply_quantized_layers`, `jnp.einsum`, `jnp.matmul` and
`lax.dot_general` are patched, and each call with two array operands made by a module other
than those layers, neither operand one of that module's params, is the site
`"<module path>/matmul_<i>"` (its i-th such call), with operands `lhs` and `rhs` quantized per
tensor at the matching rule's `a_bits`. An operand that is the very array `jax.nn.softmax`
returned (attention probabilities, passed on unchanged at inference) gets `Rule.softmax`,
RepQ-ViT's log-sqrt(2) by default, as our ViT's `attn_probs`. `x @ y` is not intercepted.
A rule's `w_range` / `a_range` let `search_layers` move its sites' bits (mixed precision).

    rules = [Rule(r"head$", w_bits=8, a_bits=8), Rule(r".*", w_bits=4, a_bits=8)]
    qparams, report = calibrate_layers(model, variables, rules, images)
    logits = apply_quantized_layers(model, variables, qparams, images)
"""

import contextlib
import dataclasses
import functools
import re
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp

from clamp_jax.models.quantized import site_params
from clamp_jax.quant.params import ACTIVATION, LOG2, LOG_SQRT2, UNIFORM, WEIGHT, SiteQuant

LAYER_TYPES = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
SOFTMAX_QUANTIZERS = ("float", UNIFORM, LOG2, LOG_SQRT2)


OutputFn = Callable[[Any], jax.Array]  # what `model.apply` returns -> logits `[B, classes]`


def logits_of(output: Any, output_fn: Optional[OutputFn]) -> jax.Array:
  """The logits in a model's output: `output_fn(output)`, or the output itself when it is an
  array; raises TypeError naming the output's type otherwise."""
  logits = output if output_fn is None else output_fn(output)
  if not isinstance(logits, jax.Array):
    raise TypeError(f"the model returned {type(output).__name__}, not logits; pass "
                    f"output_fn=..., e.g. output_fn=lambda out: out.logits")
  return logits


@dataclasses.dataclass(frozen=True)
class Rule:
  """Layers and matmuls whose path matches `pattern` (re.search) get these bit widths; 0 keeps
  that part float. A matmul's operands get `a_bits`; a softmax output among them `softmax`.

  `w_range` / `a_range` `(low, high)`: the bits mixed precision may give the kernels / the
  inputs and matmul operands (`search_layers` then searches bits under a budget), starting from
  `w_bits` / `a_bits`; None keeps those bits.
  """
  pattern: str
  w_bits: int = 8
  a_bits: int = 8
  w_symmetric: bool = False
  a_symmetric: bool = False
  softmax: str = LOG_SQRT2  # "log_sqrt2" (RepQ-ViT), "log2" (FQ-ViT), "uniform" or "float"
  w_range: Optional[Tuple[int, int]] = None
  a_range: Optional[Tuple[int, int]] = None

  def __post_init__(self):
    if self.softmax not in SOFTMAX_QUANTIZERS:
      raise ValueError(f"Rule.softmax must be one of {SOFTMAX_QUANTIZERS}, got {self.softmax!r}")
    for kind in ("w", "a"):
      bits, bit_range = getattr(self, f"{kind}_bits"), getattr(self, f"{kind}_range")
      if bit_range is not None:
        if not (len(bit_range) == 2 and 2 <= bit_range[0] <= bits <= bit_range[1] <= 16):
          raise ValueError(f"Rule({self.pattern!r}): {kind}_range={bit_range!r} must be "
                           f"(low, high) with 2 <= low <= {kind}_bits={bits} <= high <= 16")
        object.__setattr__(self, f"{kind}_range", tuple(bit_range))


@dataclasses.dataclass
class Report:
  """Which rule each layer or matmul matched, those no rule matched (float), and unused rules."""
  matched: Dict[str, str]
  unmatched_layers: List[str]
  unused_rules: List[str]


_INSIDE = threading.local()  # set while a layer is re-run with quantized params
# Per thread, while a model runs in `_intercepting`: the matmul `handler`, the stack of `modules`
# whose methods are running, the matmul `counts` per module path, the softmax outputs (`probs`),
# and `busy` while a patched function runs (an einsum's own dot_general is not a second call).
_MATMUL = threading.local()


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
    _MATMUL.modules.append(module)
    try:
      if (getattr(_INSIDE, "active", False) or context.method_name != "__call__"
          or not isinstance(module, LAYER_TYPES) or not module.has_variable("params", "kernel")):
        return next_fun(*args, **kwargs)
      return on_layer(next_fun, module, args, kwargs)
    finally:
      _MATMUL.modules.pop()
  return intercept


def _matmul_name(lhs, rhs) -> Optional[str]:
  """`"<module path>/matmul_<i>"` when `lhs x rhs` is an activation x activation matmul of the
  running module (counted), else None."""
  if not _MATMUL.modules or not all(isinstance(x, jax.Array) for x in (lhs, rhs)):
    return None
  module = _MATMUL.modules[-1]
  params = jax.tree_util.tree_leaves(module.variables.get("params", {}))
  if isinstance(module, LAYER_TYPES) or any(x is p for x in (lhs, rhs) for p in params):
    return None
  path = _layer_path(module)
  i = _MATMUL.counts[path] = _MATMUL.counts.get(path, -1) + 1
  return f"{path}/matmul_{i}".lstrip("/")


def _wrap_matmul(original: Callable, einsum: bool) -> Callable:
  """`jnp.einsum` (its `"eq", lhs, rhs` form) or `jnp.matmul` / `lax.dot_general` (`lhs, rhs,
  ...`) handing an activation x activation call's operands to this thread's handler."""
  first = 1 if einsum else 0

  @functools.wraps(original)
  def wrapper(*args, **kwargs):
    if getattr(_MATMUL, "handler", None) is None or _MATMUL.busy:
      return original(*args, **kwargs)
    _MATMUL.busy = True
    try:
      two = len(args) == 3 and isinstance(args[0], str) if einsum else len(args) >= 2
      name = two and _matmul_name(*args[first:first + 2])
      if name:
        operands = _MATMUL.handler(name, *args[first:first + 2])
        args = args[:first] + tuple(operands) + args[first + 2:]
      return original(*args, **kwargs)
    finally:
      _MATMUL.busy = False
  return wrapper


def _wrap_softmax(original: Callable) -> Callable:
  """`jax.nn.softmax` remembering its outputs while this thread has a handler."""
  @functools.wraps(original)
  def wrapper(*args, **kwargs):
    out = original(*args, **kwargs)
    if getattr(_MATMUL, "handler", None) is not None:
      _MATMUL.probs.append(out)
    return out
  return wrapper


def _is_softmax_output(x) -> bool:
  return any(x is p for p in _MATMUL.probs)


_PATCHES = ((jnp, "einsum", functools.partial(_wrap_matmul, einsum=True)),
            (jnp, "matmul", functools.partial(_wrap_matmul, einsum=False)),
            (jax.lax, "dot_general", functools.partial(_wrap_matmul, einsum=False)),
            (jax.nn, "softmax", _wrap_softmax), (nn, "softmax", _wrap_softmax))
_PATCH_LOCK = threading.Lock()
_PATCHED = dict(users=0, originals=[])  # the functions are patched while users > 0


@contextlib.contextmanager
def _intercepting(on_layer: Callable, on_matmul: Callable):
  """Within: `on_layer(next_fun, module, args, kwargs)` runs each Dense/DenseGeneral/Conv/Einsum
  call, `on_matmul(name, lhs, rhs) -> (lhs, rhs)` sees each activation x activation matmul.
  The patched functions pass other threads' calls through; the last user restores them."""
  with _PATCH_LOCK:
    if not _PATCHED["users"]:
      _PATCHED["originals"] = [(obj, name, getattr(obj, name)) for obj, name, _ in _PATCHES]
      for obj, name, wrap in _PATCHES:
        setattr(obj, name, wrap(getattr(obj, name)))
    _PATCHED["users"] += 1
  _MATMUL.__dict__.update(handler=on_matmul, modules=[], counts={}, probs=[], busy=False)
  try:
    with nn.intercept_methods(_interceptor(on_layer)):
      yield
  finally:
    _MATMUL.handler = None
    with _PATCH_LOCK:
      _PATCHED["users"] -= 1
      if not _PATCHED["users"]:
        for obj, name, original in _PATCHED["originals"]:
          setattr(obj, name, original)


def _site(x: jax.Array, rule: Rule, kind: str, quantizer: str = UNIFORM,
          weight_axes: tuple = (0,)) -> Optional[SiteQuant]:
  """`x`'s site at `rule`'s bits for `kind` (None where they are 0 or the quantizer "float"),
  calibrated as our ViT's are (min-max; log grids for softmax), with
  the rule's bit range (its fixed bits without one). A kernel reduces over `weight_axes`."""
  weight = kind == WEIGHT
  bits, bit_range = (rule.w_bits, rule.w_range) if weight else (rule.a_bits, rule.a_range)
  if not bits or quantizer == "float":
    return None
  signed = (rule.w_symmetric if weight else rule.a_symmetric) and quantizer == UNIFORM
  site = site_params(x, dict(kind=kind, bits=bits, signed=signed, quantizer=quantizer, ptf=False,
                             observer="minmax"), max(int(x.shape[0]), 1), None,
                     weight_axes=weight_axes)
  return site.replace(bit_range=bit_range or (bits, bits))


def calibrate_layers(model: nn.Module, variables: dict, rules: Sequence[Rule], *args,
                     **kwargs) -> Tuple[dict, Report]:
  """Min-max `{layer_path: {"input": SiteQuant, "kernel": SiteQuant}}` and
  `{matmul_path: {"lhs": SiteQuant, "rhs": SiteQuant}}` from one float forward; each site keeps
  its rule's bit range (mixed precision)."""
  sites, report = {}, Report({}, [], [])

  def on_layer(next_fun, module, call_args, call_kwargs):
    path = _layer_path(module)
    rule = _match(path, rules)
    if rule is None:
      report.unmatched_layers.append(path)
      return next_fun(*call_args, **call_kwargs)
    report.matched[path] = rule.pattern
    kernel = module.get_variable("params", "kernel")
    entry = {"input": _site(call_args[0], rule, ACTIVATION),
             "kernel": _site(kernel, rule, WEIGHT,
                             weight_axes=kernel_reduce_axes(module, kernel, call_args))}
    if any(entry.values()):
      sites[path] = {k: site for k, site in entry.items() if site is not None}
    return next_fun(*call_args, **call_kwargs)

  def on_matmul(name, lhs, rhs):
    rule = _match(name, rules)
    if rule is None:
      report.unmatched_layers.append(name)
      return lhs, rhs
    report.matched[name] = rule.pattern
    entry = {k: _site(x, rule, ACTIVATION, rule.softmax if _is_softmax_output(x) else UNIFORM)
             for k, x in (("lhs", lhs), ("rhs", rhs))}
    if any(entry.values()):
      sites[name] = {k: site for k, site in entry.items() if site is not None}
    return lhs, rhs

  with _intercepting(on_layer, on_matmul):
    model.apply(variables, *args, **kwargs)
  report.unused_rules = [r.pattern for r in rules if r.pattern not in report.matched.values()]
  for pattern in report.unused_rules:
    logging.warning("quantization rule %r matched no layer or activation matmul", pattern)
  return sites, report


def apply_quantized_layers(model: nn.Module, variables: dict, qparams: dict, *args, **kwargs):
  """`model.apply(variables, *args, **kwargs)` with the layers and matmuls of `qparams`
  fake-quantized."""
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

  def on_matmul(name, lhs, rhs):
    entry = qparams.get(name, {})
    quantized = lambda key, x: entry[key](x).astype(x.dtype) if key in entry else x
    return quantized("lhs", lhs), quantized("rhs", rhs)

  with _intercepting(on_layer, on_matmul):
    return model.apply(variables, *args, **kwargs)
