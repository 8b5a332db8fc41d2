"""FQ-ViT's log2 quantizer for softmax probabilities in [0, 1]."""

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
