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
from clamp_jax.search.mixed import BudgetError, MixedEvolQ, with_bits
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


def allocate(table: Table, qparams: dict, budget: Budget) -> Dict[str, int]:
  """Bits for the sites of `table`: all at their lowest, then, one site at a time, the raise
  with the largest loss reduction per fraction of the budget it spends, while one fits.

  Raises BudgetError when even the lowest bits exceed the budget."""
  sites = flatten(qparams)
  terms = matmuls(sites)
  bits = {path: float(np.asarray(site.bits)) for path, site in sites.items()}
  bits.update({path: min(losses) for path, losses in table.items()})
  involved = {path: [m for m in terms if path in (m.kernel, m.source)] for path in table}
  counted_kinds = KINDS[budget.kind]
  limit = budget.limit * budget.reference

  def change(path, new_bits):  # costs with `path` at `new_bits` minus the costs now
    def after(site):
      return new_bits if site == path else bits[site]
    return sum((np.subtract(m.cost(after), m.cost(bits.__getitem__)) for m in involved[path]),
               np.zeros(2))

  current = sum((np.array(m.cost(bits.__getitem__)) for m in terms), np.zeros(2))
  if np.any(current[counted_kinds] > limit[counted_kinds]):
    raise BudgetError(f"config.quant.budget={budget.limit} ({budget.kind}) is out of reach "
                      "with every searched site at its lowest bits")
  while True:
    best = None
    for path, losses in table.items():
      for new_bits, loss in losses.items():
        gain = losses[bits[path]] - loss
        if new_bits <= bits[path] or gain <= 0:
          continue
        extra = change(path, new_bits)
        if np.any((current + extra)[counted_kinds] > limit[counted_kinds]):
          continue
        spent = float(np.sum(extra[counted_kinds] / limit[counted_kinds]))
        ratio = gain / max(spent, 1e-12)
        if best is None or ratio > best[0]:
          best = (ratio, path, new_bits, extra)
    if best is None:
      return {path: int(bits[path]) for path in table}
    _, path, new_bits, extra = best
    bits[path], current = new_bits, current + extra


def sensitivity_start(evaluator, strategy: MixedEvolQ, qparams: dict, images,
                      blocks: Sequence[Optional[int]], budget: Budget, key: jax.Array) -> dict:
  """`qparams` with the bits of `allocate` on the `sensitivity_table` (scale and zero point
  rescaled to the new bits where they changed, `with_bits`)."""
  table = sensitivity_table(evaluator, strategy, qparams, images, blocks, key)
  chosen = allocate(table, qparams, budget)
  return replace_sites(qparams, lambda path, site: with_bits(site, chosen[path])
                       if path in chosen else site)
