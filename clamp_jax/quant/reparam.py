"""RepQ-ViT's post-LayerNorm scale reparameterization, as pure math on arrays.

A LayerNorm output y (channels on the last axis) varies strongly between channels, so it
wants per-channel grids (s_c, z_c), which a matmul input cannot use. Map channel c's grid
onto one common grid (s, z), s = mean(s_c), z = round(mean(z_c)): with r_c = s_c / s and
d_c = s (z_c - z), let y'_c = y_c / r_c + d_c.

Float equivalence. y = gamma * n + beta (n the normalized input), so y' comes from the same
LayerNorm with gamma' = gamma / r, beta' = beta / r + d. The next linear reads y' as
  sum_c y'_c W'[c] + b' = sum_c (y_c / r_c + d_c) r_c W[c] + b - sum_c d_c W'[c]
                        = sum_c y_c W[c] + b
with W'[c] = r_c W[c] and b' = b - sum_c d_c W'[c]: the folded model equals the original.

Quantization equivalence. With integer z_c (so z_c - z is an integer and passes through
the rounding), per tensor:
  round(y'_c / s) + z = round(y_c / (r_c s) + (z_c - z)) + z = round(y_c / s_c) + z_c,
which is channel c's integer on its own grid, clipped to the same [0, 2^b - 1]; and the
dequantized value (q - z) s = ((q - z_c) s_c) / r_c + d_c is the per-channel x_hat_c mapped
like y. So per-tensor quantization of y' followed by (W', b') equals per-channel quantization
of y followed by (W, b). Rounding z is what keeps z_c - z an integer.
"""

import functools

import jax
import jax.numpy as jnp

from clamp_jax.quant.observers import minmax_range, range_to_grid
from clamp_jax.quant.uniform import fake_quant


@functools.partial(jax.jit, static_argnames="percentiles")  # compiled once per shape
def channel_grids(x, bits, percentiles=(0.999, 0.9999, 0.99999)):
  """(scale_c, zero_point_c), shapes (C,): an asymmetric grid per channel of the last axis.

  Each channel takes, of the ranges [quantile(1 - p), quantile(p)] for p in `percentiles`
  (each extended to include 0) and the min-max range, the one with the least squared
  quantization error of that channel. Zero points are whole numbers.
  """
  percentiles = tuple(float(p) for p in percentiles)
  if not all(0.5 <= p <= 1.0 for p in percentiles):
    raise ValueError(f"percentiles must lie in [0.5, 1], got {percentiles}")
  x = jnp.asarray(x, jnp.float32)
  x = x.reshape(-1, x.shape[-1])  # (N, C)
  p = jnp.asarray(percentiles, jnp.float32)
  lo, hi = minmax_range(x, (0,))  # (1, C) each
  lo = jnp.concatenate([jnp.minimum(jnp.quantile(x, 1.0 - p, axis=0), 0.0), lo])
  hi = jnp.concatenate([jnp.maximum(jnp.quantile(x, p, axis=0), 0.0), hi])

  def candidate(bounds):
    scale, zero_point = range_to_grid(*bounds, bits, False)
    err = fake_quant(x, scale, zero_point, bits) - x
    return scale, zero_point, jnp.sum(err * err, axis=0)

  scales, zero_points, errors = jax.lax.map(candidate, (lo, hi))  # (K, C) each
  best = jnp.argmin(errors, axis=0)[None]
  pick = lambda v: jnp.take_along_axis(v, best, axis=0)[0]
  return pick(scales), pick(zero_points)


def common_grid(scale_c, zero_point_c):
  """(r, d, scale, zero_point): the common grid and the per-channel map onto it.

  scale = mean(scale_c), zero_point = round(mean(zero_point_c)), r = scale_c / scale,
  d = scale * (zero_point_c - zero_point).
  """
  scale = jnp.mean(scale_c)
  zero_point = jnp.round(jnp.mean(zero_point_c))
  return scale_c / scale, scale * (zero_point_c - zero_point), scale, zero_point


def fold_norm(gamma, beta, r, d):
  """LayerNorm (gamma, beta) whose output is y / r + d: (gamma / r, beta / r + d)."""
  return gamma / r, beta / r + d


def fold_linear(kernel, bias, r, d):
  """Linear reading y / r + d instead of y: kernel'[c] = r_c kernel[c],
  bias' = bias - sum_c d_c kernel'[c].

  The kernel's first axis is the input channel c, any trailing shape follows ((D, F), or
  (D, heads, head_dim)); `bias` has the trailing shape, or is None (no bias: one is made).
  """
  kernel = kernel * r.reshape((-1,) + (1,) * (kernel.ndim - 1))
  shift = jnp.tensordot(d, kernel, axes=1, precision=jax.lax.Precision.HIGHEST)
  return kernel, -shift if bias is None else bias - shift
