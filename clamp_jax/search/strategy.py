"""Evolutionary strategies over a block's quantization parameters, with a pure ask/tell interface.

A candidate is one block's `QuantParams` subtree (a dict of `SiteQuant`); a population is the
same tree with a leading `[K]` axis on every array. Strategies are frozen dataclasses (static
under `jit`); their state is a `flax.struct` dataclass (data).
"""

import dataclasses
import functools
from typing import Callable

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from clamp_jax.quant.observers import EPS
from clamp_jax.quant.params import ACTIVATION, SiteQuant, is_site


@struct.dataclass
class EvoState:
  population: dict      # candidates, leading axis K, sorted best first after `tell`
  fitness: jax.Array    # [K], lower is better


def stack(candidates) -> dict:
  """A population from a list of candidates."""
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *candidates)


def take(population, index) -> dict:
  """Candidate(s) `index` (an int or an index array) of a population."""
  return jax.tree_util.tree_map(lambda a: a[index], population)


def best(state: "EvoState") -> dict:
  """The best candidate as plain arrays on the default device, not in the population's
  sharding: programs compiled for unsharded QuantParams (the generator's step, the evaluator
  of the next block) are then reused instead of compiled again for another sharding."""
  return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a[0])), state.population)


def map_sites(fn: Callable[[SiteQuant, jax.Array], SiteQuant], key: jax.Array,
              candidate: dict) -> dict:
  """`fn(site, key)` on every site of `candidate`, each with its own key."""
  leaves, tree = jax.tree_util.tree_flatten(candidate, is_leaf=is_site)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(tree, [fn(s, k) for s, k in zip(leaves, keys)])


@dataclasses.dataclass(frozen=True)
class EvolQ:
  """Evol-Q's strategy: tournament selection with replacement, scale mutation, replace the worst.

  Mutation: `scale' = |scale + U(-r, r)|` with `r = r_3_bit_activations` for activation sites of
  at most 3 bits, else `r_low_bits` for sites of at most `low_bits` bits and `r_high_bits` above
  (absolute noise, Evol-Q's); with `relative`, `scale' = scale * |1 + U(-r, r)|`. Zero points and
  bit widths are kept.
  """
  population_size: int = 15
  num_children: int = 15
  tournament_size: int = 10
  r_low_bits: float = 1e-3
  r_high_bits: float = 1e-4
  r_3_bit_activations: float = 1e-3
  low_bits: int = 4
  relative: bool = False

  def radius(self, site: SiteQuant) -> jax.Array:
    """The mutation radius of `site` (by its bits and kind)."""
    r = jnp.where(site.bits <= self.low_bits, self.r_low_bits, self.r_high_bits)
    if site.kind == ACTIVATION:
      r = jnp.where(site.bits <= 3, self.r_3_bit_activations, r)
    return r

  def mutate(self, key: jax.Array, candidate: dict) -> dict:
    return map_sites(self.mutate_scale, key, candidate)

  def mutate_scale(self, site: SiteQuant, key: jax.Array) -> SiteQuant:
    if not site.has_scale:
      return site
    noise = jax.random.uniform(key, site.scale.shape, minval=-1.0, maxval=1.0)
    noise = noise * self.radius(site)
    scale = site.scale * jnp.abs(1 + noise) if self.relative else jnp.abs(site.scale + noise)
    return site.replace(scale=jnp.maximum(scale, EPS))

  @functools.partial(jax.jit, static_argnums=0)
  def initial_population(self, key: jax.Array, center: dict) -> dict:
    """`center` (kept unmutated, first) and `population_size - 1` mutations of it."""
    keys = jax.random.split(key, self.population_size - 1)
    mutants = jax.vmap(lambda k: self.mutate(k, center))(keys)
    return jax.tree_util.tree_map(lambda c, m: jnp.concatenate([c[None], m]), center, mutants)

  @functools.partial(jax.jit, static_argnums=0)
  def ask(self, key: jax.Array, state: EvoState) -> dict:
    """`num_children` children: each the mutated winner of a tournament drawn with replacement."""
    k_draw, k_mut = jax.random.split(key)
    draws = jax.random.randint(k_draw, (self.num_children, self.tournament_size), 0,
                               state.fitness.shape[0])
    winners = draws[jnp.arange(self.num_children), jnp.argmin(state.fitness[draws], axis=1)]
    parents = take(state.population, winners)
    return jax.vmap(self.mutate)(jax.random.split(k_mut, self.num_children), parents)

  @functools.partial(jax.jit, static_argnums=0)
  def tell(self, state: EvoState, children: dict, fitness: jax.Array) -> EvoState:
    """Children replace the worst: the best `population_size` of parents and children, best first.

    NaN fitness counts as worst; ties keep parents first (stable sort), so the best candidate
    is never lost.
    """
    union = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), state.population, children)
    scores = jnp.concatenate([state.fitness, fitness])
    scores = jnp.where(jnp.isnan(scores), jnp.inf, scores)
    keep = jnp.argsort(scores, stable=True)[:self.population_size]
    return EvoState(take(union, keep), scores[keep])

  def init(self, population: dict, fitness: jax.Array) -> EvoState:
    order = jnp.argsort(jnp.where(jnp.isnan(fitness), jnp.inf, fitness), stable=True)
    return EvoState(take(population, order), fitness[order])
