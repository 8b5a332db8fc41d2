"""Mixed precision's start by sensitivity (`config.quant.mp_start="sensitivity"`): each searched
site's output loss at each of its bit widths, the rest of the model at the start, then bits
given greedily where they buy the most loss per unit of budget.

The losses are measured one site at a time, a block's variants scored together by the search's
evaluator (an output-only one: KL of the logits, comparable across blocks). The allocation
assumes they add up; the evolutionary search then refines bits and scales from it.
"""

from typing import Dict, Optional, Sequence

import jax
import numpy as np

from clamp_jax.models.protocol import ENCODER, block_name
from clamp_jax.quant.params import flatten, replace_sites, unflatten
from clamp_jax.search.budget import KINDS, Budget, matmuls, searched
from clamp_jax.search.evaluator import BlockEvaluator, block_sites
from clamp_jax.search.mixed import BudgetError, MixedEvolQ, fit_budget, with_bits
from clamp_jax.search.strategy import stack

Table = Dict[str, Dict[int, float]]  # site path -> {bits: output loss with that site at them}


def block_prefix(block: Optional[int]) -> str:
  """The path prefix of block `block`'s sites in the whole `qparams` ("" for None: all)."""
  return "" if block is None else f"{ENCODER}/{block_name(block)}/"


def sensitivity_table(evaluator, strategy: MixedEvolQ, qparams: dict, images,
                      blocks: Sequence[Optional[int]], key: jax.Array) -> Table:
  """For every searched uniform site of `blocks`, the evaluator's score of `qparams` with that
  site alone at each bit width of its range (the start's bits included). A `BlockEvaluator`
  compiles all the blocks' programs first, in parallel (`search.precompile`)."""
  caches = evaluator.caches(qparams, images)
  measured = []  # (block, the start's sites, the variants' population, their (path, bits))
  for block in blocks:
    start = flatten(block_sites(qparams, block))
    variants, labels = [start], [None]
    for path, site in start.items():
      if not site.uniform or not searched(block_prefix(block) + path, site):
        continue
      low, high = strategy.bit_range(site)
      for bits in range(low, high + 1):
        if bits != int(np.asarray(site.bits)):
          variants.append(dict(start, **{path: with_bits(site, bits)}))
          labels.append((path, bits))
    if len(variants) > 1:
      measured.append((block, start, stack([unflatten(v) for v in variants]), labels))
  if isinstance(evaluator, BlockEvaluator) and evaluator.cfg.get("precompile", True):
    evaluator.precompile([(block, population) for block, _, population, _ in measured],
                         qparams, caches, key)
  table: Table = {}
  for block, start, population, labels in measured:
    sample = evaluator.token_sample(jax.random.fold_in(key, block or 0), caches, block)
    scores = np.asarray(evaluator.score(block, population, qparams, caches, sample), np.float64)
    for (path, bits), score in zip(labels[1:], scores[1:]):
      full = block_prefix(block) + path
      table.setdefault(full, {int(np.asarray(start[path].bits)): float(scores[0])})[bits] = score
  return table


class BitCosts:
  """Each site's bits and the model's costs that `budget` counts, changed a few sites at a time."""

  def __init__(self, qparams: dict, budget: Budget, paths, start: Optional[dict] = None):
    """The sites of `qparams` at their bits, those of `start` (`{path: bits}`) at its bits."""
    sites = flatten(qparams)
    self.terms = matmuls(sites)
    self.bits = {path: float(np.asarray(site.bits)) for path, site in sites.items()}
    self.bits.update(start or {})
    self.involved = {path: [m for m in self.terms if path in (m.kernel, m.source)]
                     for path in paths}
    self.kinds = KINDS[budget.kind]
    self.limit = (budget.limit * budget.reference)[self.kinds]
    self.current = self.costs_with({})

  def costs_with(self, moves: Dict[str, float], terms=None) -> np.ndarray:
    """`[2]`: the costs of `terms` (default: all) with the sites of `moves` at their new bits."""
    bits_of = lambda path: moves.get(path, self.bits[path])
    return sum((np.array(m.cost(bits_of)) for m in (self.terms if terms is None else terms)),
               np.zeros(2))

  def change(self, moves: Dict[str, float]) -> np.ndarray:
    """`[2]`: how much the costs change with the sites of `moves` at their new bits."""
    terms = {id(m): m for path in moves for m in self.involved[path]}.values()
    return self.costs_with(moves, terms) - self.costs_with({}, terms)

  def fits(self, extra: np.ndarray) -> bool:
    return bool(np.all((self.current + extra)[self.kinds] <= self.limit))

  def spent(self, extra: np.ndarray) -> float:
    """The fraction of the budget `extra` spends (summed over the counted costs)."""
    return float(np.sum(extra[self.kinds] / self.limit))

  def apply(self, moves: Dict[str, float], extra: np.ndarray) -> None:
    self.bits.update(moves)
    self.current = self.current + extra


def allocate(table: Table, qparams: dict, budget: Budget) -> Dict[str, int]:
  """Bits for the sites of `table`: all at their lowest, then, one site at a time, the raise
  with the largest loss reduction per fraction of the budget it spends, while one fits.

  Raises BudgetError when even the lowest bits exceed the budget."""
  state = BitCosts(qparams, budget, table,
                   start={path: min(losses) for path, losses in table.items()})
  if not state.fits(np.zeros(2)):
    raise BudgetError(f"config.quant.budget={budget.limit} ({budget.kind}) is out of reach "
                      "with every searched site at its lowest bits")
  bits = state.bits
  while True:
    best = None
    for path, losses in table.items():
      for new_bits, loss in losses.items():
        gain = losses[bits[path]] - loss
        if new_bits <= bits[path] or gain <= 0:
          continue
        extra = state.change({path: new_bits})
        if not state.fits(extra):
          continue
        ratio = gain / max(state.spent(extra), 1e-12)
        if best is None or ratio > best[0]:
          best = (ratio, {path: new_bits}, extra)
    if best is None:
      return {path: int(bits[path]) for path in table}
    state.apply(*best[1:])


def trade(table: Table, qparams: dict, budget: Budget) -> Dict[str, int]:
  """Bits for the sites of `table` from the bits they have in `qparams` (where the table was
  measured, so its losses hold there best): repeatedly the one-bit move of one site, or a site
  lowered by one bit with another raised by one, that fits the budget and lowers the table's
  summed loss the most, while one lowers it."""
  state = BitCosts(qparams, budget, table)
  bits = state.bits
  delta = lambda path, new: table[path][new] - table[path][bits[path]]  # loss change

  def steps(path):
    return [new for new in (bits[path] - 1, bits[path] + 1) if new in table[path]]

  while True:
    best = None
    singles = [{path: new} for path in table for new in steps(path)]
    downs = [(path, new) for path in table for new in steps(path) if new < bits[path]]
    ups = [(path, new) for path in table for new in steps(path) if new > bits[path]]
    pairs = [{down: a, up: b} for down, a in downs for up, b in ups if up != down]
    for moves in singles + pairs:
      gain = -sum(delta(path, new) for path, new in moves.items())
      if gain <= 1e-12 or (best is not None and gain <= best[0]):
        continue
      extra = state.change(moves)
      if state.fits(extra):
        best = (gain, moves, extra)
    if best is None:
      return {path: int(bits[path]) for path in table}
    state.apply(*best[1:])


ALLOCATIONS = {"sensitivity": allocate, "trades": trade}  # config.quant.mp_start -> allocation


def sensitivity_start(evaluator, strategy: MixedEvolQ, qparams: dict, images,
                      blocks: Sequence[Optional[int]], budget: Budget, key: jax.Array,
                      allocation=allocate) -> dict:
  """`qparams` with the bits of `allocation` (`allocate` or `trade`) on the `sensitivity_table`
  (scale and zero point rescaled to the new bits where they changed, `with_bits`). `trade`
  starts from `qparams` lowered into the budget (`fit_budget`) where they exceed it."""
  table = sensitivity_table(evaluator, strategy, qparams, images, blocks, key)
  chosen = allocation(table, fit_budget(qparams, budget, strategy), budget)
  return replace_sites(qparams, lambda path, site: with_bits(site, chosen[path])
                       if path in chosen else site)
