"""The layer-wise search: `passes` passes over the blocks, last to first, `generations` each."""

import time
from typing import Callable, List, Optional

from absl import logging
import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from clamp_jax.search.evaluator import BlockEvaluator, block_key, with_block
from clamp_jax.search.fitness import OUTPUT_LOSSES
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


def strategy_from(cfg: ml_collections.ConfigDict) -> EvolQ:
  return EvolQ(population_size=cfg.population, num_children=cfg.children,
               tournament_size=cfg.tournament, r_low_bits=cfg.r_low_bits,
               r_high_bits=cfg.r_high_bits, relative=cfg.relative)


def search_block(evaluator: BlockEvaluator, strategy: EvolQ, block: int, qparams: dict,
                 caches, key: jax.Array, generations: int):
  """`generations` generations for one block; returns `(best candidate, start fitness, best fitness)`."""
  k_init, k_sample, key = jax.random.split(key, 3)
  sample = evaluator.token_sample(k_sample, caches)
  center = qparams["Transformer"][block_key(block)]
  population = strategy.initial_population(k_init, center)
  scores = evaluator.score(block, population, qparams, caches, sample)
  start = float(scores[0])  # the unmutated current candidate
  state = strategy.init(population, scores)
  for k_gen in jax.random.split(key, generations):
    children = strategy.ask(k_gen, state)
    state = strategy.tell(state, children, evaluator.score(block, children, qparams, caches, sample))
  return take(state.population, 0), start, float(state.fitness[0])


def search(model: nn.Module, params, qparams: dict, images: jax.Array,
           cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None,
           on_block: Optional[Callable[[dict], None]] = None):
  """Searches every block's scales; returns `(qparams, history)`, one history entry per block.

  The same `cfg.seed` gives the same result whatever the number of devices.
  """
  validate(cfg)
  evaluator = BlockEvaluator(model, params, cfg, mesh)
  strategy = strategy_from(cfg)
  num_blocks = model.num_layers
  history: List[dict] = []
  key = jax.random.PRNGKey(cfg.seed)
  t0 = time.time()
  total = cfg.passes * num_blocks
  for p in range(cfg.passes):
    caches = evaluator.caches(qparams, images)  # inputs of block l depend only on blocks < l
    for block in reversed(range(num_blocks)):
      key, k_block = jax.random.split(key)
      best, before, after = search_block(evaluator, strategy, block, qparams, caches, k_block,
                                         cfg.generations)
      qparams = with_block(qparams, block, best)
      done = len(history) + 1
      elapsed = time.time() - t0
      entry = dict(pass_=p, block=block, fitness_before=before, fitness_after=after,
                   elapsed=elapsed, eta=elapsed / done * (total - done))
      history.append(entry)
      logging.info("pass %d/%d block %d: fitness %.5f -> %.5f  elapsed %.0fs  ETA %.0fs",
                   p + 1, cfg.passes, block, before, after, elapsed, entry["eta"])
      if on_block:
        on_block(entry)
  return qparams, history
