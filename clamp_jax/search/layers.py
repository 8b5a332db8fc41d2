"""Search of the scales of a linen model we did not write, quantized by `models.intercept`.

Our ViT's search reruns only a block and what follows it from cached inputs; a foreign model
has no such entry point, so every candidate (the whole `calibrate_layers` tree) runs the whole
model: `apply_quantized_layers` vmapped over the population, sharded over a "pop" mesh, scored
by the output loss against the float logits. Images are not refreshed; `cfg.w_block` is unused.
"""

import functools
import time
from typing import Any, Callable, List, Optional, Tuple

from absl import logging
import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh

from clamp_jax.models.intercept import apply_quantized_layers
from clamp_jax.search.evaluator import map_sharded, population_mesh, score_sharded
from clamp_jax.search.fitness import output_loss
from clamp_jax.search.loop import strategy_from, validate
from clamp_jax.search.strategy import best


OutputFn = Callable[[Any], jax.Array]  # what `model.apply` returns -> logits `[B, classes]`


def logits_of(output: Any, output_fn: Optional[OutputFn]) -> jax.Array:
  """The logits in a model's output: `output_fn(output)`, or the output itself when it is an
  array; raises TypeError naming the output's type otherwise."""
  logits = output if output_fn is None else output_fn(output)
  if not isinstance(logits, jax.Array):
    raise TypeError(f"the model returned {type(output).__name__}, not logits; pass "
                    f"output_fn=..., e.g. output_fn=lambda out: out.logits")
  return logits


class LayersEvaluator:
  """Fitness `[K]` of whole-model candidates on fixed images, vmapped, chunked and sharded.

  `apply_kwargs` are static keyword arguments of `model.apply` (e.g. `train=False`);
  `output_fn` reads the logits from what `model.apply` returns (default: it returns them).
  """

  def __init__(self, model: nn.Module, variables: dict, images: jax.Array,
               cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None,
               output_fn: Optional[OutputFn] = None, **apply_kwargs):
    self.model, self.variables, self.images, self.cfg = model, variables, images, cfg
    self.mesh, self.apply_kwargs = mesh or population_mesh(), apply_kwargs
    self.output_fn = output_fn
    forward = jax.jit(lambda v, x: logits_of(model.apply(v, x, **apply_kwargs), output_fn))
    self.fp_logits = forward(variables, images)

  def candidate_fitness(self, variables: dict, images: jax.Array, fp_logits: jax.Array,
                        candidate: dict) -> jax.Array:
    """The output loss of the model quantized by `candidate`."""
    q_logits = logits_of(apply_quantized_layers(self.model, variables, candidate, images,
                                                **self.apply_kwargs), self.output_fn)
    return output_loss(q_logits, fp_logits, self.cfg.output_loss, self.cfg.temperature)

  def score(self, population: dict) -> jax.Array:
    return score_sharded(
        lambda pop: self._score(self.variables, self.images, self.fp_logits, pop), population,
        self.mesh)

  @functools.partial(jax.jit, static_argnums=0)
  def _score(self, variables, images, fp_logits, population):
    """Variables are an argument, not a closure, so they are not baked into the program."""
    one = functools.partial(self.candidate_fitness, variables, images, fp_logits)
    return map_sharded(one, population, self.mesh, self.cfg.chunk_size)


def search_layers(model: nn.Module, variables: dict, qparams: dict, images: jax.Array,
                  cfg: ml_collections.ConfigDict, mesh: Optional[Mesh] = None,
                  output_fn: Optional[OutputFn] = None,
                  **apply_kwargs) -> Tuple[dict, List[dict]]:
  """`cfg.passes * cfg.generations` generations of `EvolQ` over all the scales of `qparams`
  (from `calibrate_layers`); returns `(best qparams, history)`, one history entry per pass.
  `output_fn` reads the logits from a model whose `apply` returns a structure, e.g.
  `output_fn=lambda out: out.logits` for HuggingFace's Flax models."""
  validate(cfg)
  evaluator = LayersEvaluator(model, variables, images, cfg, mesh, output_fn, **apply_kwargs)
  strategy = strategy_from(cfg)
  k_init, k_gens = jax.random.split(jax.random.PRNGKey(cfg.seed))
  population = strategy.initial_population(k_init, qparams)
  scores = evaluator.score(population)
  before = float(scores[0])  # the unmutated start
  state = strategy.init(population, scores)
  history: List[dict] = []
  t0 = time.time()
  for p, keys in enumerate(jax.random.split(k_gens, (cfg.passes, cfg.generations))):
    for key in keys:
      children = strategy.ask(key, state)
      state = strategy.tell(state, children, evaluator.score(children))
    after = float(state.fitness[0])
    history.append(dict(pass_=p, fitness_before=before, fitness_after=after,
                        elapsed=time.time() - t0))
    logging.info("pass %d/%d: fitness %.5f -> %.5f  elapsed %.0fs", p + 1, cfg.passes, before,
                 after, history[-1]["elapsed"])
    before = after
  return best(state), history
