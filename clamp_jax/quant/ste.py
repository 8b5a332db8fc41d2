"""Straight-through estimators: rounding and clipping with identity gradients."""

import jax
import jax.numpy as jnp


@jax.custom_vjp
def round_ste(x: jax.Array) -> jax.Array:
  """Round half to even; the gradient passes through unchanged."""
  return jnp.round(x)


def _round_fwd(x):
  return jnp.round(x), None


def _round_bwd(_, g):
  return (g,)


round_ste.defvjp(_round_fwd, _round_bwd)


@jax.custom_vjp
def _clip_identity(x, lo, hi):
  return jnp.clip(x, lo, hi)


def _clip_fwd(x, lo, hi):
  return jnp.clip(x, lo, hi), (lo, hi)


def _clip_bwd(bounds, g):
  lo, hi = bounds
  return g, jnp.zeros_like(lo), jnp.zeros_like(hi)


_clip_identity.defvjp(_clip_fwd, _clip_bwd)


def clip_ste(x: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Clip `x` to [lo, hi]; gradient 1 to `x` everywhere and 0 to the bounds.

  `lo` and `hi` broadcast against `x`; the result has the broadcast shape.
  """
  x = jnp.asarray(x)
  lo = jnp.asarray(lo, x.dtype)
  hi = jnp.asarray(hi, x.dtype)
  x = jnp.broadcast_to(x, jnp.broadcast_shapes(x.shape, lo.shape, hi.shape))
  return _clip_identity(x, lo, hi)
