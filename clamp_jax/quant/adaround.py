"""AdaRound (Nagel et al., 2020): a learned choice between rounding each weight down or up.

On a fixed affine grid (`scale`, `zero_point`, `bits`), a weight `w` becomes
`clip(floor(w / scale) + h(v) + zero_point, qmin, qmax)`, with `h` the rectified sigmoid of a
free logit `v` (soft, in [0, 1], while learning) or `v >= 0` (hard, the result). The penalty
`sum(1 - |2h - 1|^beta)` pushes every `h` to 0 or 1 as `beta` is annealed from high to low.
"""

import jax
import jax.numpy as jnp

from clamp_jax.quant.uniform import dequantize, int_range

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch: h reaches 0 and 1 exactly


def rectified_sigmoid(v: jax.Array) -> jax.Array:
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_logits(w: jax.Array, scale: jax.Array) -> jax.Array:
  """`v` with `h(v)` the fractional part of `w / scale`: the soft weight starts at `w`."""
  rest = w / scale - jnp.floor(w / scale)
  p = jnp.clip((rest - GAMMA) / (ZETA - GAMMA), 1e-4, 1.0 - 1e-4)
  return jnp.log(p) - jnp.log1p(-p)


def adaround_fake_quant(w: jax.Array, v: jax.Array, scale: jax.Array, zero_point: jax.Array,
                        bits, signed: bool = False, hard: bool = False) -> jax.Array:
  """`w` on the grid, rounded down or up as `v` says (soft while learning, hard at the end).
  The gradient flows to `v` only; `w` and the grid are constants."""
  up = (v >= 0).astype(w.dtype) if hard else rectified_sigmoid(v)
  qmin, qmax = int_range(bits, signed)
  q = jnp.clip(jnp.floor(w / scale) + up + zero_point, qmin, qmax)
  return dequantize(q, zero_point, scale)


def rounding_penalty(v: jax.Array, beta) -> jax.Array:
  """`sum(1 - |2 h(v) - 1|^beta)`: zero when every weight is rounded fully down or up."""
  return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)
