"""Scores a population of one block's candidates, all at once.

Only what a block's candidates change is run: the residual stream entering block `l` under
the current quantized model is cached (`Caches.block_inputs`), as are the FP targets (block
outputs and logits, once per data refresh). Candidates then run blocks `l..L-1` and the head,
`vmap`ped, in chunks of `chunk_size` (`lax.map`) when memory is short, and sharded over a
`Mesh` with a `"pop"` axis (`shard_map`): every candidate sees the same images and tokens.
A model whose blocks all share one module and QuantParams layout (the ViT: `block_module()`)
runs them as one program for every `l` (`l` an argument, the blocks after it a `fori_loop`);
otherwise (the Swin) each block compiles its own.
The Fisher weights of the "fisher" block loss are cached too, only when that loss is used.
"""

import concurrent.futures
import functools
import os
from typing import Callable, Optional, Sequence, Tuple, Union

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clamp_jax.models.protocol import ENCODER, block_index, block_name
from clamp_jax.search.fitness import Fitness

# Per-block values are indexed by block (`[l]`: `[B, N_l, D_l]`): the model's intermediates, a
# stacked `[L, B, N, D]` array or a tuple (models/protocol.py).
PerBlock = Union[jax.Array, Tuple[jax.Array, ...]]


@struct.dataclass
class Caches:
  block_inputs: PerBlock  # the stream entering each block under the current quantized model
  fp_blocks: PerBlock     # FP block outputs
  fp_logits: jax.Array    # [B, classes]
  fisher: Optional[PerBlock] = None  # g^2 of the "fisher" block loss, else None


def block_sites(qparams: dict, block: Optional[int]) -> dict:
  """Block `block`'s sites of `qparams`; all of them when `block` is None (the whole-model search
  of a foreign model, `search/layers.py`)."""
  return qparams if block is None else qparams[ENCODER][block_name(block)]


def blocks_share_a_program(model, qparams: dict) -> bool:
  """Whether one compiled program can run any block of `model` under `qparams`: the model has
  `block_module()` (all its blocks one module shape) and every block the same QuantParams layout
  (sites and their static fields)."""
  if not hasattr(model, "block_module"):
    return False
  layouts = {jax.tree_util.tree_structure(block_sites(qparams, i))
             for i in range(model.num_layers)}
  return len(layouts) == 1


def with_block(qparams: dict, block: Optional[int], candidate: dict) -> dict:
  """`qparams` with block `block`'s sites (all, when None) replaced by `candidate`."""
  if block is None:
    return candidate
  encoder = dict(qparams[ENCODER], **{block_name(block): candidate})
  return dict(qparams, **{ENCODER: encoder})


def fisher_weights(model: nn.Module, params, images: jax.Array) -> PerBlock:
  """Per block (laid out like the model's "block" intermediates): `g^2`, `g` the gradient of the
  FP model's cross-entropy to its own argmax label (summed over images, so each image's `g` is
  its own) w.r.t. the block's output.

  One forward and backward: a zero `delta[l]` is added to the output of block `l` (the module
  named `block_name(l)`, intercepted), and the gradient w.r.t. `delta` is taken at zero.
  """
  blocks = jax.eval_shape(
      lambda x: model.apply({"params": params}, x, return_intermediates=True)[1]["block"], images)

  def add_delta(delta):
    def intercept(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      block = block_index(context.module.name)
      if block is not None and context.method_name == "__call__":
        return (out[0] + delta[block],) + tuple(out[1:])
      return out
    return intercept

  def cross_entropy(delta):
    with nn.intercept_methods(add_delta(delta)):
      logits = model.apply({"params": params}, images)
    labels = jax.lax.stop_gradient(jnp.argmax(logits, axis=-1))
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))

  zeros = jax.tree_util.tree_map(lambda b: jnp.zeros(b.shape, b.dtype), blocks)
  return jax.tree_util.tree_map(jnp.square, jax.grad(cross_entropy)(zeros))


def population_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all) with the axis "pop"."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("pop",))


def shard_population(population: dict, mesh: Mesh) -> dict:
  """`population` sharded over "pop", padded (repeating the last candidate) so every device
  gets the same count."""
  k = jax.tree_util.tree_leaves(population)[0].shape[0]
  padded = -(-k // mesh.devices.size) * mesh.devices.size
  if padded != k:
    population = jax.tree_util.tree_map(
        lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], padded - k, axis=0)]), population)
  return jax.device_put(population, NamedSharding(mesh, P("pop")))


def score_sharded(score: Callable[[dict], jax.Array], population: dict, mesh: Mesh) -> jax.Array:
  """`score(population)` `[K]`, the population passed through `shard_population`."""
  k = jax.tree_util.tree_leaves(population)[0].shape[0]
  return score(shard_population(population, mesh))[:k]


def map_sharded(one: Callable[[dict], jax.Array], population: dict, mesh: Mesh,
                chunk_size: int = 0) -> jax.Array:
  """`one(candidate)` for each candidate (inside `jit`): `vmap`ped, or `lax.map`ped in chunks of
  `chunk_size`, on each device's share of the "pop" axis."""
  def local(pop):
    if chunk_size:
      return jax.lax.map(one, pop, batch_size=chunk_size)
    return jax.vmap(one)(pop)

  return jax.shard_map(local, mesh=mesh, in_specs=P("pop"), out_specs=P("pop"))(population)


class BlockEvaluator:
  """Fitness of candidates for block `l`, vmapped, chunked and sharded.

  `fitness` defaults to `Fitness.from_config(cfg)`; `cfg` also gives `block_tokens` and
  `chunk_size`.
  """

  def __init__(self, model: nn.Module, params, cfg: ml_collections.ConfigDict,
               mesh: Optional[Mesh] = None, fitness: Optional[Fitness] = None):
    self.model, self.params, self.cfg = model, params, cfg
    self.fitness = fitness or Fitness.from_config(cfg)
    self.mesh = mesh or population_mesh()
    self.block_module = model.block_module() if hasattr(model, "block_module") else None

  def caches(self, qparams: dict, images: jax.Array) -> Caches:
    """Block inputs under `qparams` and the FP targets, from whole-model forwards (jitted)."""
    return self._caches(self.params, qparams, images)

  @functools.partial(jax.jit, static_argnums=0)
  def _caches(self, params, qparams: dict, images: jax.Array) -> Caches:
    fp_logits, fp = self.model.apply({"params": params}, images, return_intermediates=True)
    _, q = self.model.apply({"params": params, "quant": qparams}, images,
                            return_intermediates=True)
    fisher = fisher_weights(self.model, params, images) if self.fitness.needs_fisher else None
    return Caches(q["block_in"], fp["block"], fp_logits, fisher)

  def token_sample(self, key: jax.Array, caches: Caches, block: int) -> jax.Array:
    """The tokens of block `block`'s output that L_C2 compares (the same for every candidate of
    a generation)."""
    total = caches.fp_blocks[block].shape[0] * caches.fp_blocks[block].shape[1]
    n = min(self.cfg.block_tokens, total)
    return jax.random.choice(key, total, (n,), replace=False)

  def candidate_outputs(self, block: int, params, qparams: dict, block_in: jax.Array,
                        candidate: dict):
    """`(block output, logits)` of `qparams` with `candidate` for block `block`, from the stream
    `block_in` entering it (runs blocks `block..L-1` and the head)."""
    variables = {"params": params, "quant": with_block(qparams, block, candidate)}
    logits, inter = self.model.apply(variables, block_in, return_intermediates=True,
                                     start_block=block)
    return inter["block"][0], logits

  def shared_outputs(self, block: jax.Array, params, qparams: dict, block_in: jax.Array,
                     candidate: dict):
    """`candidate_outputs` with `block` traced: block `block` (`block_module`, its params taken
    by index), the blocks after it in a `fori_loop`, then the head alone."""
    num_layers = self.model.num_layers
    stacked = lambda tree: jax.tree_util.tree_map(
        lambda *a: jnp.stack(a), *[tree[ENCODER][block_name(i)] for i in range(num_layers)])
    block_params, block_qparams = stacked(params), stacked(qparams)
    at = lambda tree, i: jax.tree_util.tree_map(lambda a: a[i], tree)
    run = lambda i, quant, x: self.block_module.apply(
        {"params": at(block_params, i), "quant": quant}, x)[0]
    out = run(block, candidate, block_in)
    x = jax.lax.fori_loop(block + 1, num_layers, lambda i, x: run(i, at(block_qparams, i), x),
                          out)
    logits = self.model.apply({"params": params, "quant": qparams}, x, start_block=num_layers)
    return out, logits

  def shares_programs(self, qparams: dict) -> bool:
    """Whether one program scores every block: `config.search.share_programs` and
    `blocks_share_a_program`."""
    return self.cfg.get("share_programs", True) and blocks_share_a_program(self.model, qparams)

  def program(self, block: int, qparams: dict):
    """`(jitted scorer, its block argument)`, the scorer called as `scorer(self, block argument,
    params, population, qparams, caches, sample)`: the shared program with `block` as an array,
    or block `block`'s own program."""
    if self.shares_programs(qparams):
      return BlockEvaluator._score_shared, jnp.asarray(block, jnp.int32)
    return BlockEvaluator._score, block

  def candidate_fitness(self, block, params, qparams: dict, caches: Caches,
                        sample: jax.Array, candidate: dict, shared: bool = False) -> jax.Array:
    """One candidate's fitness (`shared`: `block` is traced, see `shared_outputs`)."""
    outputs = self.shared_outputs if shared else self.candidate_outputs
    q_block, logits = outputs(block, params, qparams, caches.block_inputs[block], candidate)
    fisher = None if caches.fisher is None else caches.fisher[block]
    return self.fitness(q_block, caches.fp_blocks[block], logits, caches.fp_logits, sample,
                        fisher)

  def score(self, block: int, population: dict, qparams: dict, caches: Caches,
            sample: jax.Array) -> jax.Array:
    """Fitness `[K]` of a population for `block`."""
    scorer, block_arg = self.program(block, qparams)
    return score_sharded(
        lambda pop: scorer(self, block_arg, self.params, pop, qparams, caches, sample), population,
        self.mesh)

  def precompile(self, calls: Sequence[Tuple[int, dict]], qparams: dict, caches: Caches,
                 key: jax.Array) -> None:
    """Compiles the program `score` runs for each `(block, population)` of `calls` (any values of
    the shapes the search will pass; calls that need the same program count once), in parallel
    threads: the blocks' programs differ, and one after the other they cost most of a search's
    first pass on an accelerator (BENCHMARKS.md). `score` then finds them compiled."""
    def compile_one(call):
      block, population = call
      scorer, block_arg = self.program(block, qparams)
      sample = self.token_sample(key, caches, block)
      scorer.lower(self, block_arg, self.params, shard_population(population, self.mesh),
                   qparams, caches, sample).compile()

    shared = self.shares_programs(qparams)  # then one program per population shape

    def program(block, population):  # what tells the programs of two calls apart
      leaves, layout = jax.tree_util.tree_flatten(population)
      return None if shared else block, layout, tuple((a.shape, a.dtype) for a in leaves)

    calls = list({program(*call): call for call in calls}.values())

    # Processes of a multi-process run place the populations on their global mesh in step: one
    # thread each, in the same order.
    workers = 1 if jax.process_count() > 1 else max(1, min(len(calls), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(compile_one, calls))  # list: re-raises a failed compilation here

  @functools.partial(jax.jit, static_argnums=(0, 1))
  def _score(self, block, params, population, qparams, caches, sample):
    """Params are an argument, not a closure, so they are not baked into the program."""
    one = functools.partial(self.candidate_fitness, block, params, qparams, caches, sample)
    return map_sharded(one, population, self.mesh, self.cfg.chunk_size)

  @functools.partial(jax.jit, static_argnums=0)
  def _score_shared(self, block, params, population, qparams, caches, sample):
    """`_score` with `block` an argument: one program for every block."""
    one = functools.partial(self.candidate_fitness, block, params, qparams, caches, sample,
                            shared=True)
    return map_sharded(one, population, self.mesh, self.cfg.chunk_size)
