"""Search of the scales (and bits) of a linen model we did not write, quantized by
`models.intercept`.

Our ViT's search reruns only a block and what follows it from cached inputs; a foreign model
has no such entry point, so every candidate (the whole `calibrate_layers` tree) runs the whole
model: `apply_quantized_layers` vmapped over the population, sharded over a "pop" mesh, scored
by the output loss against the float logits. `LayersEvaluator` has `BlockEvaluator`'s interface
with the block None (the whole model), so each pass is the ViT's `search_block`: the same
strategies, data refresh and budget. `cfg.w_block` is unused.
"""

import functools
import time
from typing import List, Optional, Tuple

from absl import logging
import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from clamp_jax.models.intercept import OutputFn, apply_quantized_layers, logits_of
from clamp_jax.models.quantized import quant_config
from clamp_jax.quant.params import iter_sites
from clamp_jax.search.budget import report, searched
from clamp_jax.search.evaluator import map_sharded, population_mesh, score_sharded
from clamp_jax.search.fitness import output_loss
from clamp_jax.search.loop import Refresh, search_block, start_strategy, validate


class LayersEvaluator:
  """Fitness `[K]` of whole-model candidates, vmapped, chunked and sharded.

  `apply_kwargs` are static keyword arguments of `model.apply` (e.g. `train=False`);
  `output_fn` reads the logits from what `model.apply` returns (default: it returns them).
  """

  def __init__(self, model: nn.Module, variables: dict, cfg: ml_collections.ConfigDict,
               mesh: Optional[Mesh] = None, output_fn: Optional[OutputFn] = None,
               **apply_kwargs):
    self.model, self.variables, self.cfg = model, variables, cfg
    self.mesh, self.apply_kwargs = mesh or population_mesh(), apply_kwargs
    self.output_fn = output_fn
    self.forward = jax.jit(lambda v, x: logits_of(model.apply(v, x, **apply_kwargs), output_fn))

  def caches(self, qparams: dict, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """`(images, float logits)`: what candidates are scored on (`qparams` is unused: a candidate
    is the whole model)."""
    return images, self.forward(self.variables, images)

  def token_sample(self, key: jax.Array, caches, block: None) -> None:
    """No tokens: the fitness has no block term."""
    return None

  def candidate_fitness(self, variables: dict, images: jax.Array, fp_logits: jax.Array,
                        candidate: dict) -> jax.Array:
    """The output loss of the model quantized by `candidate`."""
    q_logits = logits_of(apply_quantized_layers(self.model, variables, candidate, images,
                                                **self.apply_kwargs), self.output_fn)
    return output_loss(q_logits, fp_logits, self.cfg.output_loss, self.cfg.temperature)

  def score(self, block: None, population: dict, qparams: dict, caches, sample) -> jax.Array:
    """Fitness `[K]` of a population of whole-model candidates on `caches` (`block`, `qparams`
    and `sample` are `BlockEvaluator`'s, unused)."""
    images, fp_logits = caches
    return score_sharded(lambda pop: self._score(self.variables, images, fp_logits, pop),
                         population, self.mesh)

  @functools.partial(jax.jit, static_argnums=0)
  def _score(self, variables, images, fp_logits, population):
    """Variables are an argument, not a closure, so they are not baked into the program."""
    one = functools.partial(self.candidate_fitness, variables, images, fp_logits)
    return map_sharded(one, population, self.mesh, self.cfg.chunk_size)


def search_layers(model: nn.Module, variables: dict, qparams: dict, images: jax.Array,
                  cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None,
                  output_fn: Optional[OutputFn] = None,
                  quant_cfg: Optional[ml_collections.ConfigDict] = None,
                  refresh: Optional[Refresh] = None, **apply_kwargs) -> Tuple[dict, List[dict]]:
  """`cfg.passes` passes of `cfg.generations` generations over all the sites of `qparams` (from
  `calibrate_layers`); returns `(best qparams, history)`, one history entry per pass.

  `output_fn` reads the logits from a model whose `apply` returns a structure, e.g.
  `output_fn=lambda out: out.logits` for HuggingFace's Flax models. Where a rule gave a bit
  range (`Rule.w_range`, `a_range`), bits are searched too (`MixedEvolQ`) under the budget of
  `quant_cfg` (`budget`, `budget_kind`, `budget_w_bits`, `budget_a_bits`, `bit_mutation_prob`;
  default `quant_config()`'s: the size of the model with those sites at W4/A8), the start first
  lowered into it; the other sites keep their bits. `refresh(qparams, key) -> images`
  regenerates the images against the current quantized model every `cfg.refresh_every`
  generations (e.g. `generate` on a `models.foreign.ForeignViT`).
  """
  validate(cfg)
  evaluator = LayersEvaluator(model, variables, cfg, mesh, output_fn, **apply_kwargs)
  quant_cfg = (quant_cfg or quant_config()).copy_and_resolve_references()
  quant_cfg.mixed = any(searched(path, site) for path, site in iter_sites(qparams))
  kl_cfg = cfg.copy_and_resolve_references()
  kl_cfg.output_loss = "kl"  # the sensitivity start's loss, comparable across sites
  kl_only = LayersEvaluator(model, variables, kl_cfg, mesh, output_fn, **apply_kwargs)
  strategy, budget, qparams = start_strategy(
      cfg, quant_cfg, qparams, (kl_only, images, [None], jax.random.PRNGKey(cfg.seed)))
  history: List[dict] = []
  t0 = time.time()
  for p in range(cfg.passes):
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), p)
    # block None: the best candidate is the whole qparams
    qparams, before, after, images = search_block(evaluator, strategy, None, qparams, images, key,
                                                  cfg, budget, refresh)
    history.append(dict(pass_=p, fitness_before=before, fitness_after=after,
                        elapsed=time.time() - t0, **(report(qparams) if budget else {})))
    logging.info("pass %d/%d: fitness %.5f -> %.5f  elapsed %.0fs", p + 1, cfg.passes, before,
                 after, history[-1]["elapsed"])
  return qparams, history
