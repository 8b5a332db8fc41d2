"""Uniform (affine) fake quantization with the bit width as data.

Asymmetric grid: q in [0, 2^b - 1]; symmetric grid: q in [-2^(b-1), 2^(b-1) - 1]
with zero point 0. In both cases x_hat = (q - zero_point) * scale. `bits` is an
array (or Python number), so changing it never retraces a jitted caller.
"""

import jax
import jax.numpy as jnp

from clamp_jax.quant.ste import clip_ste, round_ste


def int_range(bits, signed: bool) -> tuple[jax.Array, jax.Array]:
  """(qmin, qmax) of the `bits`-bit grid as float32 arrays."""
  bits = jnp.asarray(bits, jnp.float32)
  if signed:
    half = 2.0 ** (bits - 1)
    return -half, half - 1
  return bits * 0.0, 2.0 ** bits - 1  # (zeros_like would carry a sharding into shard_map)


def _clip_masked(q, qmin, qmax):
  """Clip with gradient 1 where `q` lies in [qmin, qmax] (bounds included), 0 elsewhere."""
  inside = (q >= qmin) & (q <= qmax)
  return jnp.where(inside, q, jnp.clip(q, qmin, qmax))


def quantize_int(x, scale, zero_point, bits, signed: bool,
                 mask_grad: bool = False) -> jax.Array:
  """Integer grid value clip(round(x / scale) + zero_point, qmin, qmax), as float.

  mask_grad=False: the gradient to `x` passes through the clip everywhere (STE);
  mask_grad=True: it is zero where the clip is active. The gradient to `scale` is LSQ's
  (Esser et al., 2020) either way: where the clip is active, `x / scale` is a constant of
  `scale`, so a clipped value pulls its end of the grid towards it.
  """
  qmin, qmax = jax.lax.stop_gradient(int_range(bits, signed))  # bits get no gradient
  ratio = x / scale
  unclipped = jax.lax.stop_gradient(jnp.round(ratio) + zero_point)
  inside = (unclipped >= qmin) & (unclipped <= qmax)
  ratio = jnp.where(inside, ratio, x / jax.lax.stop_gradient(scale))
  q = round_ste(ratio) + zero_point
  clip = _clip_masked if mask_grad else clip_ste
  return clip(q, qmin, qmax)


def dequantize(q, zero_point, scale) -> jax.Array:
  """(q - zero_point) * scale: the only dequantization, shared with export."""
  return (q - zero_point) * scale


def fake_quant(x, scale, zero_point, bits, signed: bool = False,
               mask_grad: bool = False) -> jax.Array:
  """Quantize `x` to the grid and back to float, with straight-through gradients."""
  q = quantize_int(x, scale, zero_point, bits, signed, mask_grad)
  return dequantize(q, zero_point, scale)
