"""PTQ4ViT's twin-uniform quantizer for GELU outputs.

GELU's negative part lies in [-0.17, 0] while its positive part reaches tens, so one step
wastes levels on one side or the other. Twin-uniform spends one of the b bits on the region
(sign) and b - 1 on the magnitude: negatives get a fixed fine step, q in [-2^(b-1), 0];
non-negatives the step `scale`, q in [0, 2^(b-1) - 1]; 2^b levels in all, 0 shared.
"""

import jax
import jax.numpy as jnp

from clamp_jax.quant.observers import range_to_grid
from clamp_jax.quant.uniform import fake_quant

GELU_MIN = 0.16997  # |min GELU(x)|, at x ~ -0.75: the negative region's extent


def twin_uniform_fake_quant(x, scale, bits, neg_scale=None) -> jax.Array:
  """x_hat = step * q with step = neg_scale for x < 0, `scale` otherwise.

  neg_scale defaults to GELU_MIN / 2^(b-1), so the negative grid ends at -GELU_MIN.
  Straight-through rounding and clipping (gradient 1 to `x` everywhere).
  """
  x = jnp.asarray(x, jnp.float32)
  if neg_scale is None:
    neg_scale = jax.lax.stop_gradient(GELU_MIN / 2.0 ** (jnp.asarray(bits, jnp.float32) - 1))
  # On the signed b-bit grid q in [-2^(b-1), 2^(b-1) - 1], rounding keeps the sign of x,
  # so each side uses exactly its half of it.
  negative = fake_quant(x, neg_scale, 0.0, bits, signed=True)
  non_negative = fake_quant(x, scale, 0.0, bits, signed=True)
  return jnp.where(x < 0, negative, non_negative)


def twin_uniform_scale(x, bits) -> jax.Array:
  """Min-max step of the non-negative side: max(max(x), 0) / (2^(b-1) - 1), at least EPS."""
  hi = jnp.maximum(jnp.max(jnp.asarray(x, jnp.float32)), 0.0)
  return range_to_grid(0.0, hi, bits, signed=True)[0]
