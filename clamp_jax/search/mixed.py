"""Mixed precision: a bit-width gene per site, mutated by +-1, the site's grid rescaled to the
new bits over the range it covers when its bits change; and the start lowered into the budget."""

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clamp_jax.quant.observers import range_to_grid
from clamp_jax.quant.params import ACTIVATION, WEIGHT, SiteQuant, replace_sites
from clamp_jax.quant.uniform import int_range
from clamp_jax.search.budget import Budget, counted, report, searched
from clamp_jax.search.strategy import EvolQ, map_sites

MAX_BITS = 16


class BudgetError(ValueError):
  """`config.quant.budget` cannot be met even with every searched site at its lowest bits."""


def with_bits(site: SiteQuant, bits) -> SiteQuant:
  """`site` at `bits`; where they changed, the grid at the new bits covers the range its grid
  covers now (the clipping the observer or the search chose is kept)."""
  bits = jnp.asarray(bits, jnp.float32)
  _, qmax = int_range(site.bits, site.signed)
  if site.signed:
    lo, hi = -qmax * site.scale, qmax * site.scale
  else:
    lo, hi = -site.zero_point * site.scale, (qmax - site.zero_point) * site.scale
  scale, zero_point = range_to_grid(lo, hi, bits, site.signed)
  changed = bits != site.bits
  return site.replace(bits=bits, scale=jnp.where(changed, scale, site.scale),
                      zero_point=jnp.where(changed, zero_point, site.zero_point))


@dataclasses.dataclass(frozen=True)
class MixedEvolQ(EvolQ):
  """`EvolQ` whose mutation also moves each site's bits by +-1 (each with probability
  `bit_mutation_prob / 2`) within the site's own `bit_range`, else within `w_bits` (weights) or
  `a_bits` (activations), inclusive. Sites other than uniform grids keep their bits."""
  w_bits: Tuple[int, int] = (2, 8)
  a_bits: Tuple[int, int] = (4, 8)
  bit_mutation_prob: float = 0.2

  def mutate(self, key: jax.Array, candidate: dict) -> dict:
    k_scale, k_bits = jax.random.split(key)
    return map_sites(self.mutate_bits, k_bits, super().mutate(k_scale, candidate))

  def mutate_bits(self, site: SiteQuant, key: jax.Array) -> SiteQuant:
    if not site.uniform:
      return site
    u, p = jax.random.uniform(key), self.bit_mutation_prob
    step = jnp.where(u < p / 2, -1.0, jnp.where(u < p, 1.0, 0.0))
    return with_bits(site, jnp.clip(site.bits + step, *self.bit_range(site)))

  def bit_range(self, site: SiteQuant) -> Tuple[int, int]:
    """The bits `site` may take, inclusive: its own `bit_range`, else its kind's."""
    return site.bit_range or (self.w_bits if site.kind == WEIGHT else self.a_bits)


def pin_uncounted(qparams: dict) -> dict:
  """`qparams` with each uniform site the budget does not count (q, k, v: their matmuls have no
  weight) fixed at its bits (`bit_range` of one width), so that mixed precision does not raise
  them for free."""
  keep = counted(qparams)

  def pin(path, site):
    if path in keep or not site.uniform:
      return site
    bits = int(np.asarray(site.bits))
    return site.replace(bit_range=(bits, bits))

  return replace_sites(qparams, pin)


def lowered(qparams: dict, kind: str, floor: int, steps: int = 1) -> dict:
  """Every searched uniform site of `kind` `steps` bits lower, not below `floor` (the low end of
  the site's own `bit_range` where it has one)."""
  def lower(path, site):
    if site.kind != kind or not site.uniform or not searched(path, site):
      return site
    return with_bits(site, jnp.maximum(site.bits - steps,
                                       site.bit_range[0] if site.bit_range else floor))

  return replace_sites(qparams, lower)


def fit_budget(qparams: dict, budget: Budget, strategy: MixedEvolQ) -> dict:
  """The search's start: `qparams` as they are when within `budget`, else with every searched
  weight site, then every activation site, lowered one bit at a time until within it.

  Raises BudgetError naming config.quant.budget when even the minimum bits exceed it.
  """
  floors = ((WEIGHT, strategy.w_bits[0]), (ACTIVATION, strategy.a_bits[0]))
  lowest = qparams
  for kind, floor in floors:
    lowest = lowered(lowest, kind, floor, MAX_BITS)
  if not budget.allows(lowest):
    raise BudgetError(
        f"config.quant.budget={budget.limit} ({budget.kind}) is out of reach: with the searched "
        f"sites at their minimum bits (w {strategy.w_bits[0]}, a {strategy.a_bits[0]}, or the "
        f"low end of a site's own range) the model costs {report(lowest)}")
  for kind, floor in floors:
    for _ in range(MAX_BITS):
      if budget.allows(qparams):
        return qparams
      qparams = lowered(qparams, kind, floor)
  return qparams
