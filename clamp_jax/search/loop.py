"""The layer-wise search: `passes` passes over the blocks, last to first, `generations` each.

With `config.quant.mixed`, bits are searched too (`MixedEvolQ`) and a candidate over the budget
scores inf, so it is never kept; the start is first lowered into the budget (`fit_budget`).
"""

import time
from typing import Callable, List, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from clamp_jax.models.quantized import validate as validate_quant
from clamp_jax.search.budget import Budget, report
from clamp_jax.search.evaluator import BlockEvaluator, block_key, with_block
from clamp_jax.search.fitness import OUTPUT_LOSSES
from clamp_jax.search.mixed import MixedEvolQ, fit_budget
from clamp_jax.search.strategy import EvolQ, take


def search_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.search` section with its defaults (the paper's schedule), then `overrides`."""
  cfg = ml_collections.ConfigDict(dict(
      enabled=False, passes=10, generations=6, population=15, children=15, tournament=10,
      r_low_bits=1e-3, r_high_bits=1e-4, relative=False,
      w_block=1.0, w_output=1.0, output_loss="contrastive", temperature=3.0,
      block_tokens=256,   # tokens sampled for the block-local contrastive loss
      chunk_size=0,       # candidates per lax.map step on a device; 0: all at once (vmap)
      seed=0))
  cfg.update(overrides)
  return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible `config.search` value."""
  for field in ("passes", "generations", "population", "children", "tournament", "block_tokens"):
    if cfg[field] < 1:
      raise ValueError(f"config.search.{field}={cfg[field]} must be at least 1")
  if cfg.output_loss not in OUTPUT_LOSSES:
    raise ValueError(f"config.search.output_loss={cfg.output_loss!r}; known: {OUTPUT_LOSSES}")
  if cfg.temperature <= 0:
    raise ValueError(f"config.search.temperature={cfg.temperature} must be positive")
  if cfg.chunk_size < 0:
    raise ValueError(f"config.search.chunk_size={cfg.chunk_size} must be 0 or positive")


def strategy_from(cfg: ml_collections.ConfigDict,
                  quant_cfg: Optional[ml_collections.ConfigDict] = None) -> EvolQ:
  """`EvolQ` from `config.search`; `MixedEvolQ` when `config.quant.mixed`."""
  evol = dict(population_size=cfg.population, num_children=cfg.children,
              tournament_size=cfg.tournament, r_low_bits=cfg.r_low_bits,
              r_high_bits=cfg.r_high_bits, relative=cfg.relative)
  if quant_cfg is not None and quant_cfg.mixed:
    return MixedEvolQ(**evol, w_bits=(quant_cfg.w_bits_min, quant_cfg.w_bits_max),
                      a_bits=(quant_cfg.a_bits_min, quant_cfg.a_bits_max),
                      bit_mutation_prob=quant_cfg.bit_mutation_prob)
  return EvolQ(**evol)


def search_block(evaluator: BlockEvaluator, strategy: EvolQ, block: int, qparams: dict,
                 caches, key: jax.Array, generations: int, budget: Optional[Budget] = None):
  """`generations` generations for one block; returns `(best candidate, start fitness, best
  fitness)`. Candidates over `budget` (with the rest of `qparams` as it is) score inf.
  """
  k_init, k_sample, key = jax.random.split(key, 3)
  sample = evaluator.token_sample(k_sample, caches)

  def score(population):
    scores = evaluator.score(block, population, qparams, caches, sample)
    if budget is None:
      return scores
    return jnp.where(budget.allows(with_block(qparams, block, population)), scores, jnp.inf)

  center = qparams["Transformer"][block_key(block)]
  population = strategy.initial_population(k_init, center)
  scores = score(population)
  start = float(scores[0])  # the unmutated current candidate
  state = strategy.init(population, scores)
  for k_gen in jax.random.split(key, generations):
    children = strategy.ask(k_gen, state)
    state = strategy.tell(state, children, score(children))
  return take(state.population, 0), start, float(state.fitness[0])


def search(model: nn.Module, params, qparams: dict, images: jax.Array,
           cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None,
           on_block: Optional[Callable[[dict], None]] = None,
           quant_cfg: Optional[ml_collections.ConfigDict] = None):
  """Searches every block's scales (and bits, when `quant_cfg.mixed`); returns `(qparams,
  history)`, one history entry per block (with mixed precision, the model's costs after it).

  The same `cfg.seed` gives the same result whatever the number of devices.
  """
  validate(cfg)
  evaluator = BlockEvaluator(model, params, cfg, mesh)
  strategy = strategy_from(cfg, quant_cfg)
  num_blocks = model.num_layers
  budget = None
  if isinstance(strategy, MixedEvolQ):
    validate_quant(quant_cfg)
    budget = Budget.of(qparams, quant_cfg.budget, quant_cfg.budget_kind)
    qparams = fit_budget(qparams, budget, strategy, num_blocks)
  history: List[dict] = []
  key = jax.random.PRNGKey(cfg.seed)
  t0 = time.time()
  total = cfg.passes * num_blocks
  for p in range(cfg.passes):
    caches = evaluator.caches(qparams, images)  # inputs of block l depend only on blocks < l
    for block in reversed(range(num_blocks)):
      key, k_block = jax.random.split(key)
      best, before, after = search_block(evaluator, strategy, block, qparams, caches, k_block,
                                         cfg.generations, budget)
      qparams = with_block(qparams, block, best)
      done = len(history) + 1
      elapsed = time.time() - t0
      entry = dict(pass_=p, block=block, fitness_before=before, fitness_after=after,
                   elapsed=elapsed, eta=elapsed / done * (total - done),
                   **(report(qparams) if budget else {}))
      history.append(entry)
      logging.info("pass %d/%d block %d: fitness %.5f -> %.5f  elapsed %.0fs  ETA %.0fs%s",
                   p + 1, cfg.passes, block, before, after, elapsed, entry["eta"],
                   "".join(f"  {k} {v:.3f}" for k, v in entry.items() if k.endswith("_vs_w4a8")))
      if on_block:
        on_block(entry)
  return qparams, history
