"""Observers: pure functions of a calibration batch returning (scale, zero_point).

`reduce_axes` are the axes one scale covers: None reduces everything (per-tensor,
shape () results); a tuple keeps the reduced axes as size 1, e.g. (0,) on an
(in, out) kernel gives per-output-channel (1, out) results. `bits` is data.
"""

from typing import Optional

import jax
import jax.numpy as jnp

from clamp_jax.quant.uniform import fake_quant, int_range

EPS = 1e-8  # floor of every scale, so constant tensors never divide by zero


def _reduce(fn, x, reduce_axes, **kwargs):
  return fn(x, axis=reduce_axes, keepdims=reduce_axes is not None, **kwargs)


def range_to_grid(lo, hi, bits, signed: bool):
  """(scale, zero_point) of the grid covering [lo, hi], with lo <= 0 <= hi."""
  qmin, qmax = int_range(bits, signed)
  if signed:
    scale = jnp.maximum(jnp.maximum(-lo, hi) / jnp.maximum(qmax, 1.0), EPS)
    return scale, jnp.zeros_like(scale)
  scale = jnp.maximum((hi - lo) / qmax, EPS)
  return scale, jnp.clip(jnp.round(-lo / scale), qmin, qmax)


def minmax_range(x, reduce_axes):
  """[min(x, 0), max(x, 0)] over `reduce_axes`: the range `minmax` covers."""
  lo = jnp.minimum(_reduce(jnp.min, x, reduce_axes), 0.0)
  hi = jnp.maximum(_reduce(jnp.max, x, reduce_axes), 0.0)
  return lo, hi


def _sq_error(x, scale, zero_point, bits, signed, reduce_axes):
  err = fake_quant(x, scale, zero_point, bits, signed) - x
  return _reduce(jnp.sum, err * err, reduce_axes)


def minmax(x, bits, signed: bool = False, reduce_axes: Optional[tuple] = None):
  """Grid covering [min(x, 0), max(x, 0)] over `reduce_axes`."""
  x = jnp.asarray(x, jnp.float32)
  return range_to_grid(*minmax_range(x, reduce_axes), bits, signed)


def percentile(x, bits, signed: bool = False, reduce_axes: Optional[tuple] = None,
               pct: float = 99.99):
  """Like `minmax`, with the (100 - pct) and pct percentiles as the range ends."""
  if not 50.0 <= pct <= 100.0:
    raise ValueError(f"pct must lie in [50, 100], got {pct}")
  x = jnp.asarray(x, jnp.float32)
  lo = jnp.minimum(_reduce(jnp.percentile, x, reduce_axes, q=100.0 - pct), 0.0)
  hi = jnp.maximum(_reduce(jnp.percentile, x, reduce_axes, q=pct), 0.0)
  return range_to_grid(lo, hi, bits, signed)


def omse(x, bits, signed: bool = False, reduce_axes: Optional[tuple] = None,
         num_candidates: int = 40, min_shrink: float = 0.3):
  """Min-max range shrunk by the alpha in linspace(min_shrink, 1, num_candidates)
  that minimises the squared quantization error of each group.

  Candidates run one after another (lax.map), so memory stays at one copy of `x`.
  """
  if num_candidates < 1:
    raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
  if not 0.0 < min_shrink <= 1.0:
    raise ValueError(f"min_shrink must lie in (0, 1], got {min_shrink}")
  x = jnp.asarray(x, jnp.float32)
  lo, hi = minmax_range(x, reduce_axes)

  def candidate(alpha):
    scale, zero_point = range_to_grid(lo * alpha, hi * alpha, bits, signed)
    return scale, zero_point, _sq_error(x, scale, zero_point, bits, signed, reduce_axes)

  alphas = jnp.linspace(min_shrink, 1.0, num_candidates, dtype=jnp.float32)
  scales, zero_points, errors = jax.lax.map(candidate, alphas)
  best = jnp.argmin(errors, axis=0)[None]
  pick = lambda v: jnp.take_along_axis(v, best, axis=0)[0]
  return pick(scales), pick(zero_points)


def ptf(x, bits, num_factors: int = 3, channel_axis: int = -1):
  """FQ-ViT power-of-two factor for LayerNorm inputs (asymmetric grid).

  One base scale s = (max_c hi_c - min_c lo_c) / (2^b - 1) / 2^K and one zero
  point shared by all channels; channel c gets scale s * 2^k_c with k_c in 0..K
  (K = num_factors) minimising its squared error. k_c = K is exactly the per-tensor
  `minmax` grid, so the error never exceeds it. Returns scale with shape
  (1, ..., C, ..., 1) (at least EPS / 2^K) and a scalar zero point.
  """
  x = jnp.asarray(x, jnp.float32)
  if num_factors < 0:
    raise ValueError(f"num_factors must be >= 0, got {num_factors}")
  if not -x.ndim <= channel_axis < x.ndim:
    raise ValueError(f"channel_axis {channel_axis} is out of range for shape {x.shape}")
  axis = channel_axis % x.ndim
  reduce_axes = tuple(a for a in range(x.ndim) if a != axis)
  lo, hi = minmax_range(x, reduce_axes)
  top_scale, zero_point = range_to_grid(jnp.min(lo), jnp.max(hi), bits, False)
  base = top_scale / 2.0 ** num_factors

  def candidate(k):
    return _sq_error(x, base * 2.0 ** k, zero_point, bits, False, reduce_axes)

  factors = jnp.arange(num_factors + 1, dtype=jnp.float32)
  best = jnp.argmin(jax.lax.map(candidate, factors), axis=0)
  return base * 2.0 ** factors[best], zero_point
