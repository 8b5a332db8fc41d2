"""Block-wise reconstruction of the weights' rounding after the search (AdaRound / BRECQ).

Blocks are taken first to last. For block `l`, the stream entering it under the quantized model
(earlier blocks already rounded) is fixed, and the rounding logits of the block's kernels are
learned with optax (Adam) so that the block's output matches the float model's output on the
float stream: `sum of squared errors per image + weight * rounding_penalty`, with `beta`
annealed from `beta_start` to `beta_end` after `warmup` of the steps. The grids (the search's
QuantParams) stay as they are: the result is float params whose block kernels lie on their grid,
so fake-quantizing them again changes nothing, and the export and `--mode=eval` read them as any
other params.
"""

import functools
from typing import Callable, Dict

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clamp_jax.models.protocol import ENCODER, block_name
from clamp_jax.models.vit import OBSERVE
from clamp_jax.quant import adaround
from clamp_jax.quant.params import WEIGHT, flatten, unflatten
from clamp_jax.search.evaluator import PerBlock, fisher_weights


LOSSES = ("fisher", "mse")


def reconstruct_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.reconstruct` section with its defaults, then `overrides`."""
  cfg = ml_collections.ConfigDict(dict(
      enabled=False,
      loss="mse",         # "mse", or "fisher": squared error weighted by the FP model's g^2
      steps=100,          # optimizer steps per unit (the embedding, each block)
      lr=1e-2,            # Adam on the rounding logits
      penalty=0.01,       # weight of the rounding penalty
      beta_start=20.0, beta_end=2.0,
      warmup=0.2,         # fraction of the steps without the penalty
      batch_size=0,       # images per step; 0: all calibration images
      embedding=True,     # the patch embedding's kernel first (its output against the float one)
      blocks=True,        # then every block's kernels, first to last
      # Each element of the block's input is the quantized stream's with this probability, else
      # the float stream's: 1.0 BRECQ (the quantized stream), 0.5 QDrop, 0.0 the float stream.
      quantized_input=1.0,
      seed=0))
  cfg.update(overrides)
  return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible `config.reconstruct` value."""
  if cfg.steps < 1:
    raise ValueError(f"config.reconstruct.steps={cfg.steps} must be at least 1")
  for field in ("lr", "beta_start", "beta_end"):
    if cfg[field] <= 0:
      raise ValueError(f"config.reconstruct.{field}={cfg[field]} must be positive")
  if cfg.loss not in LOSSES:
    raise ValueError(f"config.reconstruct.loss={cfg.loss!r}; known: {LOSSES}")
  if cfg.penalty < 0 or cfg.batch_size < 0:
    raise ValueError("config.reconstruct.penalty and batch_size must be 0 or positive")
  if not 0.0 <= cfg.quantized_input <= 1.0:
    raise ValueError(f"config.reconstruct.quantized_input={cfg.quantized_input} must lie in "
                     "[0, 1]")
  if not 0.0 <= cfg.warmup < 1.0:
    raise ValueError(f"config.reconstruct.warmup={cfg.warmup} must lie in [0, 1)")


EMBEDDING_KERNEL = "embedding/kernel"


def block_weight_sites(qparams: dict, block: int) -> Dict[str, object]:
  """`{param path: SiteQuant}` of the kernels of block `block` (quantized weights only)."""
  prefix = f"{ENCODER}/{block_name(block)}/"
  return {path: site for path, site in flatten(qparams).items()
          if path.startswith(prefix) and site.kind == WEIGHT}


def _flat(params) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def _rounded(kernels: dict, logits: dict, sites: dict, hard: bool) -> dict:
  """`{path: kernel}` on each site's grid, rounded as the logits say."""
  out = {}
  for path, kernel in kernels.items():
    site = sites[path]
    view = kernel.reshape(-1, site.scale.shape[-1])  # the site's (inputs, outputs) view
    q = adaround.adaround_fake_quant(view, logits[path], site.scale, site.zero_point, site.bits,
                                     site.signed, hard)
    out[path] = q.reshape(kernel.shape)
  return out


def _beta(cfg, step):
  """The penalty's exponent: `beta_start` after the warmup, annealed to `beta_end`."""
  begin = cfg.warmup * cfg.steps
  frac = jnp.clip((step - begin) / jnp.maximum(cfg.steps - begin, 1.0), 0.0, 1.0)
  return cfg.beta_end + (cfg.beta_start - cfg.beta_end) * (1.0 - frac)


def learn_rounding(sites: dict, params: dict, unit_out: Callable, x: jax.Array,
                   x_fp: jax.Array, target: jax.Array, weights: jax.Array,
                   cfg: ml_collections.ConfigDict, key: jax.Array):
  """`({kernel path: rounded kernel}, {"before", "after"})`: the kernels of `sites` rounded so
  that `unit_out(params, x)` matches `target`, and the weighted mean squared error (hard
  rounding, from `x`) before (nearest rounding) and after. Each step's input takes each element
  from `x` with probability `cfg.quantized_input`, else from `x_fp`."""
  flat_params = _flat(params)
  kernels = {path: flat_params[path] for path in sites}

  def out(rounded, x):
    return unit_out(flax.traverse_util.unflatten_dict(dict(flat_params, **rounded), sep="/"), x)

  def error(rounded, x, y, w):
    return jnp.mean(w * jnp.square(out(rounded, x) - y))

  def loss(logits, beta, use_penalty, x, y, w):
    rounded = _rounded(kernels, logits, sites, hard=False)
    rec = jnp.sum(w * jnp.square(out(rounded, x) - y)) / x.shape[0]
    penalty = sum(adaround.rounding_penalty(v, beta) for v in logits.values())
    return rec + use_penalty * cfg.penalty * penalty

  optimizer = optax.adam(cfg.lr)

  @jax.jit
  def step(logits, opt_state, i, x, x_fp, y, w, key):
    x = jnp.where(jax.random.bernoulli(key, cfg.quantized_input, x.shape), x, x_fp)
    use_penalty = (i >= cfg.warmup * cfg.steps).astype(jnp.float32)
    grads = jax.grad(loss)(logits, _beta(cfg, i), use_penalty, x, y, w)
    updates, opt_state = optimizer.update(grads, opt_state, logits)
    return optax.apply_updates(logits, updates), opt_state

  view = lambda path: kernels[path].reshape(-1, sites[path].scale.shape[-1])
  logits = {path: adaround.init_logits(view(path), sites[path].scale) for path in kernels}
  nearest = {path: sites[path](view(path)).reshape(kernels[path].shape) for path in kernels}
  before = float(jax.jit(error)(nearest, x, target, weights))
  opt_state = optimizer.init(logits)
  n = x.shape[0]
  batch = cfg.batch_size or n
  batch_key, drop_key = jax.random.split(key)
  for i in range(cfg.steps):
    idx = (jax.random.choice(jax.random.fold_in(batch_key, i), n, (batch,), replace=False)
           if batch < n else slice(None))
    logits, opt_state = step(logits, opt_state, jnp.asarray(i, jnp.float32), x[idx], x_fp[idx],
                             target[idx], weights[idx], jax.random.fold_in(drop_key, i))
  rounded = jax.tree_util.tree_map(np.asarray, _rounded(kernels, logits, sites, hard=True))
  after = float(jax.jit(error)(rounded, x, target, weights))
  return rounded, dict(before=before, after=after)


def _without(qparams: dict, sites: dict) -> dict:
  """`qparams` less `sites`: while learning, the soft kernels are not quantized again."""
  return unflatten({p: s for p, s in flatten(qparams).items() if p not in sites})


def reconstruct_embedding(model, params: dict, qparams: dict, images: jax.Array,
                          cfg: ml_collections.ConfigDict, key: jax.Array):
  """The patch embedding's kernel rounded so that its output (site `patch_embed`) on the
  (quantized) images matches the float model's: `learn_rounding`'s result."""
  sites = {p: s for p, s in flatten(qparams).items() if p == EMBEDDING_KERNEL}
  act_qparams = _without(qparams, sites)
  unit_out = lambda p, x: patch_embedding(model, {"params": p, "quant": act_qparams}, x)
  target = patch_embedding(model, {"params": params}, images)
  return learn_rounding(sites, params, unit_out, images, images, target,
                        jnp.ones(target.shape), cfg, key)


def patch_embedding(model, variables: dict, images: jax.Array) -> jax.Array:
  """The patch embedding's output (the `patch_embed` site's value) of `images`."""
  _, state = model.apply(variables, images, mutable=[OBSERVE])
  return state[OBSERVE]["patch_embed"][0]


def reconstruct_block(model, params: dict, qparams: dict, block: int, block_in: jax.Array,
                      fp_block_in: jax.Array, target: jax.Array, weights: jax.Array,
                      cfg: ml_collections.ConfigDict, key: jax.Array):
  """Block `block`'s kernels rounded so that its output from the stream `block_in` (and
  `fp_block_in`, see `learn_rounding`) matches `target`: `learn_rounding`'s result."""
  sites = block_weight_sites(qparams, block)
  act_qparams = _without(qparams, sites)

  def unit_out(variables_params, x):
    _, inter = model.apply({"params": variables_params, "quant": act_qparams}, x,
                           return_intermediates=True, start_block=block)
    return inter["block"][0]

  return learn_rounding(sites, params, unit_out, block_in, fp_block_in, target, weights, cfg,
                        key)


@functools.partial(jax.jit, static_argnums=0)
def _streams(model, params, qparams, images):
  """`(block inputs, block outputs)` of `params` under `qparams` (none: the float model), each
  indexed by block."""
  _, inter = model.apply({"params": params, "quant": qparams}, images, return_intermediates=True)
  return inter["block_in"], inter["block"]


def error_weights(model, params, images: jax.Array, loss: str, targets: PerBlock) -> PerBlock:
  """Weights of each block output's squared error, laid out like the block outputs `targets`:
  ones ("mse"), or the FP model's `g^2` w.r.t. the block output ("fisher", BRECQ's diagonal
  Fisher), each block's scaled to mean 1."""
  if loss == "mse":
    return jax.tree_util.tree_map(jnp.ones_like, targets)
  mean_per_block = lambda w: jnp.mean(w, axis=(-3, -2, -1), keepdims=True)  # [..., B, N, D]
  return jax.tree_util.tree_map(lambda w: w / mean_per_block(w),
                                fisher_weights(model, params, images))


def reconstruct(model, params, qparams: dict, images: jax.Array,
                cfg: ml_collections.ConfigDict):
  """`(params, history)`: `params` with the patch embedding's and every block's kernels rounded
  by AdaRound on `images` (first to last), and per unit the reconstruction error before and
  after."""
  validate(cfg)
  fp_block_in, targets = _streams(model, params, {}, images)  # the float model's, once
  key = jax.random.PRNGKey(cfg.seed)
  weights = error_weights(model, params, images, cfg.loss, targets)
  history = []
  if cfg.embedding and EMBEDDING_KERNEL in flatten(qparams):  # before any block: float params
    rounded, errors = reconstruct_embedding(model, params, qparams, images, cfg,
                                            jax.random.fold_in(key, -1 % 2**31))
    params = flax.traverse_util.unflatten_dict(dict(_flat(params), **rounded), sep="/")
    history.append(dict(block="embedding", **errors))
    logging.info("reconstruct the patch embedding: error %.4g -> %.4g", errors["before"],
                 errors["after"])
  for block in range(model.num_layers if cfg.blocks else 0):
    block_in = _streams(model, params, qparams, images)[0]  # earlier units rounded
    rounded, errors = reconstruct_block(model, params, qparams, block, block_in[block],
                                        fp_block_in[block], targets[block], weights[block], cfg,
                                        jax.random.fold_in(key, block))
    params = flax.traverse_util.unflatten_dict(dict(_flat(params), **rounded), sep="/")
    history.append(dict(block=block, **errors))
    logging.info("reconstruct block %d: error %.4g -> %.4g", block, errors["before"],
                 errors["after"])
  return params, history
