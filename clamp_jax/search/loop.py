"""The layer-wise search: `passes` passes over the blocks, last to first, `generations` each.

With `config.quant.mixed`, bits are searched too (`MixedEvolQ`) and a candidate over the budget
scores inf, so it is never kept; the start is first lowered into the budget (`fit_budget`).
"""

import time
from typing import Callable, List, Optional, Sequence, Tuple

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from clamp_jax.models.quantized import validate as validate_quant
from clamp_jax.search.allocate import ALLOCATIONS, sensitivity_start
from clamp_jax.search.budget import Budget, report
from clamp_jax.search.evaluator import BlockEvaluator, block_sites, with_block
from clamp_jax.search.fitness import BLOCK_LOSSES, OUTPUT_LOSSES, Fitness
from clamp_jax.search.mixed import MixedEvolQ, fit_budget, pin_uncounted
from clamp_jax.search.strategy import EvolQ, best, take


# What the sensitivity start measures with: (an output-only evaluator, images, blocks, key).
Sensitivity = Tuple[object, jax.Array, Sequence[Optional[int]], jax.Array]
Refresh = Callable[[dict, jax.Array], jax.Array]  # (current qparams, key) -> new images
OnBlock = Callable[[dict, dict, jax.Array], None]  # (history entry, qparams, images)


def search_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.search` section with its defaults (the paper's schedule), then `overrides`."""
  cfg = ml_collections.ConfigDict(dict(
      enabled=False, passes=10, generations=6, population=15, children=15, tournament=10,
      # Scale-invariant mutation, scale * |1 + U(-r, r)| (Evol-Q's absolute |scale + U(-r, r)|
      # with r 1e-3 / 1e-4: relative=False): r_low_bits at <= 4 bits, r_high_bits above, and
      # r_3_bit_activations for activations of <= 3 bits, whose best clipping lies far from the
      # start (BENCHMARKS.md: +5 to +9 held-in top-1 at W4/A3 on two models).
      r_low_bits=0.05, r_high_bits=0.01, r_3_bit_activations=0.15, relative=True,
      # L_F = w_block * block term + w_output * output term (search/fitness.py): L_C2 + KL, the
      # fitness that tracked held-in top-1 and CE best (BENCHMARKS); the paper's L_C2 + L_O is
      # output_loss="contrastive".
      block_loss="contrastive", output_loss="kl", w_block=1.0, w_output=1.0,
      temperature=3.0,
      block_tokens=256,   # tokens sampled for the block-local contrastive loss
      chunk_size=0,       # candidates per lax.map step on a device; 0: all at once (vmap)
      refresh_every=3,    # generations between data refreshes (the CLAMP cycle: C / 2); 0: never
      precompile=True,    # compile every block's evaluator program at once, in parallel threads
      share_programs=True,  # one evaluator program for all blocks where they share a shape (ViT)
      seed=0))
  cfg.update(overrides)
  return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible `config.search` value."""
  for field in ("passes", "generations", "population", "children", "tournament", "block_tokens"):
    if cfg[field] < 1:
      raise ValueError(f"config.search.{field}={cfg[field]} must be at least 1")
  if cfg.block_loss not in BLOCK_LOSSES:
    raise ValueError(f"config.search.block_loss={cfg.block_loss!r}; known: {BLOCK_LOSSES}")
  if cfg.output_loss not in OUTPUT_LOSSES:
    raise ValueError(f"config.search.output_loss={cfg.output_loss!r}; known: {OUTPUT_LOSSES}")
  if cfg.temperature <= 0:
    raise ValueError(f"config.search.temperature={cfg.temperature} must be positive")
  for field in ("chunk_size", "refresh_every"):
    if cfg[field] < 0:
      raise ValueError(f"config.search.{field}={cfg[field]} must be 0 or positive")


def strategy_from(cfg: ml_collections.ConfigDict,
                  quant_cfg: Optional[ml_collections.ConfigDict] = None) -> EvolQ:
  """`EvolQ` from `config.search`; `MixedEvolQ` when `config.quant.mixed`."""
  evol = dict(population_size=cfg.population, num_children=cfg.children,
              tournament_size=cfg.tournament, r_low_bits=cfg.r_low_bits,
              r_high_bits=cfg.r_high_bits, r_3_bit_activations=cfg.r_3_bit_activations,
              relative=cfg.relative)
  if quant_cfg is not None and quant_cfg.mixed:
    return MixedEvolQ(**evol, w_bits=(quant_cfg.w_bits_min, quant_cfg.w_bits_max),
                      a_bits=(quant_cfg.a_bits_min, quant_cfg.a_bits_max),
                      bit_mutation_prob=quant_cfg.bit_mutation_prob)
  return EvolQ(**evol)


def start_strategy(cfg: ml_collections.ConfigDict, quant_cfg: Optional[ml_collections.ConfigDict],
                   qparams: dict, sensitivity: Optional[Sensitivity] = None
                   ) -> Tuple[EvolQ, Optional[Budget], dict]:
  """`(strategy, budget, qparams)` to start a search from: `EvolQ`, no budget and `qparams`;
  with `quant_cfg.mixed`, `MixedEvolQ`, `quant_cfg`'s budget and `qparams` with the sites the
  budget does not count pinned at their bits, then lowered into the budget, or, with
  `quant_cfg.mp_start="sensitivity"` or `"trades"` and `sensitivity` (`(output-only evaluator, images,
  blocks, key)`; None for a resumed search, whose bits are already chosen), allocated by it."""
  strategy = strategy_from(cfg, quant_cfg)
  if not isinstance(strategy, MixedEvolQ):
    return strategy, None, qparams
  validate_quant(quant_cfg)
  qparams = pin_uncounted(qparams)
  budget = Budget.from_config(qparams, quant_cfg)
  if quant_cfg.mp_start in ALLOCATIONS and sensitivity is not None:
    evaluator, images, blocks, key = sensitivity
    return strategy, budget, sensitivity_start(evaluator, strategy, qparams, images, blocks,
                                               budget, key, ALLOCATIONS[quant_cfg.mp_start])
  return strategy, budget, fit_budget(qparams, budget, strategy)


def search_block(evaluator: BlockEvaluator, strategy: EvolQ, block: Optional[int],
                 qparams: dict, images: jax.Array, key: jax.Array,
                 cfg: ml_collections.ConfigDict, budget: Optional[Budget] = None,
                 refresh: Optional[Refresh] = None):
  """`cfg.generations` generations for one block: `(best candidate, start fitness, best fitness,
  images)`, both fitnesses on the images returned. Candidates over `budget` (with the rest of
  `qparams` as it is) score inf. Block None: the candidates are the whole `qparams` (a foreign
  model's `LayersEvaluator`).

  With `refresh`, every `cfg.refresh_every` generations the images are regenerated against the
  current model (this block's best in place), the caches rebuilt and the population rescored on
  the new images, the start put back in place of the worst: the start stays in the population,
  so the best fitness never exceeds the start's on the images the block ends with.
  """
  k_init, k_sample, k_gens = jax.random.split(key, 3)

  def prepare(images, k):  # what the evaluator caches for a set of images
    caches = evaluator.caches(qparams, images)  # block inputs depend only on earlier blocks
    return caches, evaluator.token_sample(k, caches, block)

  def score(population, caches, sample):
    scores = evaluator.score(block, population, qparams, caches, sample)
    if budget is None:
      return scores
    return jnp.where(budget.allows(with_block(qparams, block, population)), scores, jnp.inf)

  data = prepare(images, k_sample)
  population = strategy.initial_population(k_init, block_sites(qparams, block))
  start_candidate = take(population, 0)  # the unmutated current candidate
  scores = score(population, *data)
  start = float(scores[0])
  state = strategy.init(population, scores)
  for g, k_gen in enumerate(jax.random.split(k_gens, cfg.generations)):
    if refresh is not None and cfg.refresh_every and g and g % cfg.refresh_every == 0:
      k_refresh, k_sample = jax.random.split(jax.random.fold_in(k_gen, 1))
      images = refresh(with_block(qparams, block, best(state)), k_refresh)
      data = prepare(images, k_sample)
      population = jax.tree_util.tree_map(lambda p, s: p.at[-1].set(s), state.population,
                                          start_candidate)
      scores = score(population, *data)
      start = float(scores[-1])
      state = strategy.init(population, scores)
    children = strategy.ask(k_gen, state)
    state = strategy.tell(state, children, score(children, *data))
  return best(state), start, float(state.fitness[0]), images


def precompile(evaluator: BlockEvaluator, strategy: EvolQ, qparams: dict, images: jax.Array,
               blocks) -> None:
  """Compiles the evaluator's programs of `blocks` for the start population and the children
  (`BlockEvaluator.precompile`), all at once before the search, with progress output."""
  t0 = time.time()
  caches = evaluator.caches(qparams, images)
  key = jax.random.PRNGKey(0)  # the values do not matter, only the shapes
  calls = []
  for block in sorted(set(blocks)):
    population = strategy.initial_population(key, block_sites(qparams, block))
    children = strategy.ask(key, strategy.init(population, jnp.zeros(strategy.population_size)))
    calls += [(block, population), (block, children)]
  logging.info("compiling the evaluator's programs for %d blocks, in parallel", len(set(blocks)))
  evaluator.precompile(calls, qparams, caches, key)
  logging.info("compiled them in %.0fs", time.time() - t0)


def search_order(cfg: ml_collections.ConfigDict, num_blocks: int) -> List[Tuple[int, int]]:
  """`(pass, block)` in the order searched: `passes` passes over the blocks, last to first."""
  return [(p, b) for p in range(cfg.passes) for b in reversed(range(num_blocks))]


def search(model: nn.Module, params, qparams: dict, images: jax.Array,
           cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None,
           on_block: Optional[OnBlock] = None,
           quant_cfg: Optional[ml_collections.ConfigDict] = None,
           refresh: Optional[Refresh] = None, start: int = 0):
  """Searches every block's scales (and bits, when `quant_cfg.mixed`); returns `(qparams,
  history)`, one history entry per block searched (with mixed precision, the model's costs
  after it).

  `refresh(qparams, key) -> images` regenerates the calibration images against the current
  model every `cfg.refresh_every` generations (the CLAMP cycle); None keeps them. `start` skips
  the first `start` blocks of `search_order` (a resumed run passes the `qparams` and `images` it
  had then); `on_block(entry, qparams, images)` runs after each block. Each block's key depends
  only on the seed and its position, so a resumed run continues exactly. The same `cfg.seed`
  gives the same result whatever the number of devices.
  """
  validate(cfg)
  evaluator = BlockEvaluator(model, params, cfg, mesh)
  sensitivity = None
  if start == 0 and quant_cfg is not None and quant_cfg.mixed:
    kl_only = BlockEvaluator(model, params, cfg, mesh, Fitness(output_loss="kl", w_block=0.0))
    sensitivity = (kl_only, images, range(model.num_layers), jax.random.PRNGKey(cfg.seed))
  strategy, budget, qparams = start_strategy(cfg, quant_cfg, qparams, sensitivity)
  order = search_order(cfg, model.num_layers)
  if cfg.get("precompile", True) and start < len(order):
    precompile(evaluator, strategy, qparams, images, [b for _, b in order[start:]])
  history: List[dict] = []
  t0 = time.time()
  for position in range(start, len(order)):
    p, block = order[position]
    k_block = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), position)
    best, before, after, images = search_block(evaluator, strategy, block, qparams, images,
                                               k_block, cfg, budget, refresh)
    qparams = with_block(qparams, block, best)
    elapsed = time.time() - t0
    done = position + 1 - start
    entry = dict(pass_=p, block=block, fitness_before=before, fitness_after=after,
                 elapsed=elapsed, eta=elapsed / done * (len(order) - position - 1),
                 **(report(qparams) if budget else {}))
    history.append(entry)
    logging.info("pass %d/%d block %d: fitness %.5f -> %.5f  elapsed %.0fs  ETA %.0fs%s",
                 p + 1, cfg.passes, block, before, after, elapsed, entry["eta"],
                 "".join(f"  {k} {v:.3f}" for k, v in entry.items() if k.endswith("_vs_w4a8")))
    if on_block:
      on_block(entry, qparams, images)
  return qparams, history
