"""Integer export: int8 storage of grid values whose dequantization equals fake_quant.

Both grids are stored as signed integers: the asymmetric grid [0, 2^b - 1] is
shifted by -2^(b-1), together with its zero point, so it lands in
[-2^(b-1), 2^(b-1) - 1]. The shift cancels in q - zero_point, so `from_int`
needs no bit width. Grids of fewer than 8 bits (int4, ...) are stored in int8 too.
"""

import jax
import jax.numpy as jnp
import numpy as np

from clamp_jax.quant.uniform import dequantize, quantize_int


def _concrete(value):
  """`value` as a NumPy array, or None while it is traced."""
  try:
    return np.asarray(value)
  except jax.errors.TracerArrayConversionError:
    return None


def _check_bits(bits):
  b = _concrete(bits)
  if b is not None and np.any((b < 1) | (b > 8) | (b != np.round(b))):
    raise ValueError(f"integer export needs whole bit widths in 1..8, got {b}")


def _check_zero_point(zp_shifted):
  zp = _concrete(zp_shifted)
  if zp is not None and np.any((zp < -128) | (zp > 127) | (zp != np.round(zp))):
    raise ValueError(f"zero_point is not a whole number on the int8 grid: {zp}")


def to_int(x, scale, zero_point, bits, signed: bool) -> tuple[jax.Array, jax.Array]:
  """(q, zero_point) as int8 arrays; from_int(q, zero_point, scale) == fake_quant(...)."""
  _check_bits(bits)
  shift = 0.0 if signed else 2.0 ** (jnp.asarray(bits, jnp.float32) - 1)
  zp_shifted = jnp.asarray(zero_point, jnp.float32) - shift
  _check_zero_point(zp_shifted)
  q = quantize_int(x, scale, zero_point, bits, signed) - shift
  return q.astype(jnp.int8), zp_shifted.astype(jnp.int8)


def from_int(q_int8, zp_int8, scale) -> jax.Array:
  """Float32 dequantization of exported integers."""
  return dequantize(jnp.asarray(q_int8).astype(jnp.float32),
                    jnp.asarray(zp_int8).astype(jnp.float32), scale)
