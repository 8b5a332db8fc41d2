"""Logarithmic quantizers for softmax probabilities in [0, 1].

FQ-ViT's log2 (levels 2^-q) and RepQ-ViT's log-sqrt(2) (levels Delta * 2^(-q/2), twice as
dense). `bits` is data, so changing it never retraces a jitted caller.
"""

import jax
import jax.numpy as jnp

from clamp_jax.quant.ste import clip_ste, round_ste

_TINY = float(jnp.finfo(jnp.float32).tiny)


def log2_fake_quant(x, bits) -> jax.Array:
  """x_hat = 2^-q with q = clip(round(-log2 x), 0, 2^b - 1), straight-through gradients.

  Zeros (and any x <= 0) map to the smallest level 2^-(2^b - 1), as do values below
  it; values above 1 map to 1. In float32 levels below 2^-126 flush to 0, so for
  b >= 7 the smallest level, and hence the image of zero, is 0. Values and gradients
  stay finite for every x >= 0.
  """
  x = jnp.asarray(x, jnp.float32)
  qmax = jax.lax.stop_gradient(2.0 ** jnp.asarray(bits, jnp.float32) - 1)
  neg_log = jnp.where(x > 0, -jnp.log2(jnp.maximum(x, _TINY)), qmax)
  q = clip_ste(round_ste(neg_log), 0.0, qmax)
  return 2.0 ** -q


def log_sqrt2_fake_quant(x, bits, delta=1.0) -> jax.Array:
  """RepQ-ViT's log-sqrt(2) quantizer: q = clip(round(-2 log2(x / delta)), 0, 2^b - 1).

  RepQ-ViT writes x_hat = delta * 2^(-ceil(q/2)) * (sqrt(2) if q is odd else 1); for odd q
  that is delta * 2^(-(q+1)/2 + 1/2) = delta * 2^(-q/2), as for even q, so the levels are
  {delta * 2^(-q/2)}. Values above delta map to delta; values whose unclipped q exceeds
  2^b - 1 (x <= delta * 2^(-(2^b - 0.5)/2)) and any x <= 0 map to 0. `delta` (the largest
  level) broadcasts against `x`. Straight-through gradient: exactly 1 to `x` wherever the
  output is a level (above delta too, as with clip_ste), 0 where it is flushed to 0; to
  `delta`, 2^(-q/2) (the level's derivative with q held fixed). In float32 levels below
  2^-126 may flush to 0 (b = 8).
  """
  x = jnp.asarray(x, jnp.float32)
  delta = jnp.asarray(delta, jnp.float32)
  qmax = jax.lax.stop_gradient(2.0 ** jnp.asarray(bits, jnp.float32) - 1)
  ratio = jax.lax.stop_gradient(jnp.maximum(x, _TINY) / delta)
  q = jnp.round(-2.0 * jnp.log2(ratio))
  level = delta * 2.0 ** (-jnp.clip(q, 0.0, qmax) / 2)
  straight = x - jax.lax.stop_gradient(x)  # exactly 0, gradient 1
  return jnp.where((x > 0) & (q <= qmax), level + straight, 0.0)
