"""Block-wise reconstruction of the weights' rounding after the search (AdaRound / BRECQ).

Blocks are taken first to last. For block `l`, the stream entering it under the quantized model
(earlier blocks already rounded) is fixed, and the rounding logits of the block's kernels are
learned with optax (Adam) so that the block's output matches the float model's output on the
float stream: `sum of squared errors per image + weight * rounding_penalty`, with `beta`
annealed from `beta_start` to `beta_end` after `warmup` of the steps. The grids (the search's
QuantParams) stay as they are: the result is float params whose block kernels lie on their grid,
so fake-quantizing them again changes nothing, and the export and `--mode=eval` read them as any
other params. With `act_scale_lr` > 0 the step of each of the block's activation sites is learned
alongside (LSQ's gradient, as QDrop does), and the QuantParams come back with those steps.
"""

import dataclasses
import functools
from typing import Dict

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clamp_jax.models.protocol import ENCODER, block_name
from clamp_jax.models.vit import OBSERVE
from clamp_jax.quant import adaround
from clamp_jax.quant.params import (ACTIVATION, WEIGHT, flatten, iter_sites, replace_sites,
                                    unflatten)
from clamp_jax.search.evaluator import (PerBlock, block_sites, blocks_share_a_program,
                                       fisher_weights)


LOSSES = ("fisher", "mse")
EXTRA_ANCHORS = ("start", "search")


def reconstruct_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.reconstruct` section with its defaults, then `overrides`."""
  cfg = ml_collections.ConfigDict(dict(
      enabled=False,
      loss="mse",         # "mse", or "fisher": squared error weighted by the FP model's g^2
      steps=100,          # optimizer steps per unit (the embedding, each block)
      lr=1e-2,            # Adam on the rounding logits
      # Adam on the log of each block activation site's step, learned with the rounding; 0: the
      # search's steps stay.
      act_scale_lr=0.0,
      # Adam on the log of each rounded kernel's per-channel step, learned with the rounding on
      # the integer grid fixed at the start (Genie-M); 0: the search's steps stay.
      w_scale_lr=0.0,
      penalty=0.01,       # weight of the rounding penalty
      # Weight of the kernels' drift from their float values: the squared kernel error over
      # nearest rounding's, per kernel, times the unit's error at nearest rounding (so 1.0 makes
      # doubling the kernels' error cost as much as the unit's whole starting error). It pulls
      # the rounding toward the float kernels where the images say little; 0: off (AdaRound).
      w_error=0.0,
      beta_start=20.0, beta_end=2.0,
      warmup=0.2,         # fraction of the steps without the penalty
      batch_size=0,       # images per step; 0: all calibration images
      # Images beyond the search's: this many more of the calibration source (a fresh generation
      # for psaq/clamp), fitted on together with the search's final images.
      extra_images=0,
      # The quantized model that anchors the extra images' contrastive loss (clamp): "start",
      # min-max on the new images as in the first generation, or "search", the search's
      # QuantParams (the model about to be reconstructed, as the search's refreshes do).
      extra_anchor="start",
      embedding=True,     # the patch embedding's kernel first (its output against the float one)
      blocks=True,        # then every block's kernels, first to last
      head=False,         # then the head's (and pre_logits') kernels: the logits against the FP's
      # Each element of the block's input is the quantized stream's with this probability, else
      # the float stream's: 1.0 BRECQ (the quantized stream), 0.5 QDrop, 0.0 the float stream.
      quantized_input=1.0,
      # One program for every block of a model with `block_module()` (our ViT), rather than
      # one per block: the same rounding, compiled once.
      share_programs=True,
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
  if cfg.extra_anchor not in EXTRA_ANCHORS:
    raise ValueError(f"config.reconstruct.extra_anchor={cfg.extra_anchor!r}; known: "
                     f"{EXTRA_ANCHORS}")
  for field in ("penalty", "batch_size", "extra_images", "act_scale_lr", "w_scale_lr",
                "w_error"):
    if cfg[field] < 0:
      raise ValueError(f"config.reconstruct.{field}={cfg[field]} must be 0 or positive")
  if not 0.0 <= cfg.quantized_input <= 1.0:
    raise ValueError(f"config.reconstruct.quantized_input={cfg.quantized_input} must lie in "
                     "[0, 1]")
  if not 0.0 <= cfg.warmup < 1.0:
    raise ValueError(f"config.reconstruct.warmup={cfg.warmup} must lie in [0, 1)")


EMBEDDING_KERNEL = "embedding/kernel"
HEAD_PREFIXES = ("pre_logits/", "head/")


def block_weight_sites(qparams: dict, block: int) -> Dict[str, object]:
  """`{param path: SiteQuant}` of the kernels of block `block` (quantized weights only)."""
  prefix = f"{ENCODER}/{block_name(block)}/"
  return {path: site for path, site in flatten(qparams).items()
          if path.startswith(prefix) and site.kind == WEIGHT}


def block_activation_paths(qparams: dict, prefix: str = "") -> list:
  """Paths (under `prefix`) of the activation sites of `qparams` whose step can be learned."""
  return [path for path, site in iter_sites(qparams, ACTIVATION)
          if path.startswith(prefix) and site.has_scale]


def _step_times_exp(site, log_scale):
  """`site` with its step times `exp(log_scale)`."""
  return site.replace(scale=site.scale * jnp.exp(log_scale))


def _rescaled(quant: dict, log_scales: dict) -> dict:
  """`quant` with the step of each site named in `log_scales` times `exp(log_scale)`."""
  if not log_scales:
    return quant
  return replace_sites(quant, lambda path, site: _step_times_exp(site, log_scales[path])
                       if path in log_scales else site)


def _flat(params) -> dict:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def _with(params: dict, kernels: dict) -> dict:
  """`params` with the kernels `{path: kernel}` in place."""
  return flax.traverse_util.unflatten_dict(dict(_flat(params), **kernels), sep="/")


def _rounded(kernels: dict, logits: dict, sites: dict, hard: bool,
             w_log_scales: dict) -> dict:
  """`{path: kernel}` on each site's integer grid, rounded as the logits say, each step times
  `exp(w_log_scales[path])` where given."""
  out = {}
  for path, kernel in kernels.items():
    site = sites[path]
    view = kernel.reshape(-1, site.scale.shape[-1])  # the site's (inputs, outputs) view
    q = adaround.adaround_fake_quant(view, logits[path], site.scale, site.zero_point, site.bits,
                                     site.signed, hard)
    if path in w_log_scales:
      q = q * jnp.exp(w_log_scales[path])
    out[path] = q.reshape(kernel.shape)
  return out


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The optimizer's settings of `config.reconstruct`, hashable: a static argument of `_step`."""
  steps: int
  lr: float
  act_scale_lr: float
  w_scale_lr: float
  penalty: float
  w_error: float
  beta_start: float
  beta_end: float
  warmup: float
  quantized_input: float

  @classmethod
  def of(cls, cfg: ml_collections.ConfigDict) -> "Schedule":
    return cls(**{field.name: cfg[field.name] for field in dataclasses.fields(cls)})

  def beta(self, step):
    """The penalty's exponent: `beta_start` after the warmup, annealed to `beta_end`."""
    begin = self.warmup * self.steps
    frac = jnp.clip((step - begin) / jnp.maximum(self.steps - begin, 1.0), 0.0, 1.0)
    return self.beta_end + (self.beta_start - self.beta_end) * (1.0 - frac)

  def optimizer(self) -> optax.GradientTransformation:
    """Adam on `{"logits": ..., "log_scales": ..., "w_log_scales": ...}`, each at its rate."""
    rates = {"logits": self.lr, "log_scales": self.act_scale_lr,
             "w_log_scales": self.w_scale_lr}
    return optax.multi_transform({name: optax.adam(rate) for name, rate in rates.items()},
                                 {name: name for name in rates})


# A unit's output is `unit(frozen, kernels, x)`: `frozen` = (the params, the activation
# QuantParams) it reads, `kernels` the ones being rounded ({path in those params: kernel}), `x`
# its input. Units are hashable static arguments of `_error` and `_step`: equal units share
# their programs.


@dataclasses.dataclass(frozen=True)
class EmbeddingUnit:
  """The patch embedding's output (site `patch_embed`) of images."""
  model: nn.Module

  def __call__(self, frozen, kernels, x):
    params, quant = frozen
    return patch_embedding(self.model, {"params": _with(params, kernels), "quant": quant}, x)


@dataclasses.dataclass(frozen=True)
class ModelBlockUnit:
  """Block `block`'s output from the stream entering it, run by the whole model (a program per
  block)."""
  model: nn.Module
  block: int

  def __call__(self, frozen, kernels, x):
    params, quant = frozen
    _, inter = self.model.apply({"params": _with(params, kernels), "quant": quant}, x,
                                return_intermediates=True, start_block=self.block)
    return inter["block"][0]


@dataclasses.dataclass(frozen=True)
class SharedBlockUnit:
  """A block's output from the stream entering it, run by the model's `block_module()` on that
  block's params and QuantParams: one program for all blocks of one layout."""
  module: nn.Module

  def __call__(self, frozen, kernels, x):
    params, quant = frozen
    return self.module.apply({"params": _with(params, kernels), "quant": quant}, x)[0]


@dataclasses.dataclass(frozen=True)
class LogitsUnit:
  """The whole model's logits of images: the head's unit (only its kernels are learned, so
  the gradient stops at the head)."""
  model: nn.Module

  def __call__(self, frozen, kernels, x):
    params, quant = frozen
    return self.model.apply({"params": _with(params, kernels), "quant": quant}, x)


@functools.partial(jax.jit, static_argnums=0)
def _error(unit, frozen, kernels, x, y, w):
  """Weighted mean squared error of the unit's output against `y`."""
  return jnp.mean(w * jnp.square(unit(frozen, kernels, x) - y))


def kernel_drift(rounded: dict, kernels: dict, nearest_error: dict) -> jax.Array:
  """Mean over kernels of `sum((rounded - kernel)^2)` over nearest rounding's (`nearest_error`):
  1 at nearest rounding, 0 at the float kernels."""
  return sum(jnp.sum(jnp.square(rounded[path] - kernel)) / nearest_error[path]
             for path, kernel in kernels.items()) / len(kernels)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _step(unit, schedule: Schedule, learned, opt_state, i, frozen, kernels, sites, x, x_fp, y, w,
          key, drift_scale):
  """One Adam step on `learned` (`{"logits": rounding logits, "log_scales": activation steps,
  "w_log_scales": kernel steps}`),
  each input element drawn from `x` with probability `schedule.quantized_input`, else from
  `x_fp`. `drift_scale`: `(the unit's error per image at nearest rounding, {path: nearest
  rounding's squared kernel error})`, the scale of the `w_error` term."""
  def loss(learned, x):
    rounded = _rounded(kernels, learned["logits"], sites, False, learned["w_log_scales"])
    quant = _rescaled(frozen[1], learned["log_scales"])
    rec = jnp.sum(w * jnp.square(unit((frozen[0], quant), rounded, x) - y)) / x.shape[0]
    penalty = sum(adaround.rounding_penalty(v, schedule.beta(i))
                  for v in learned["logits"].values())
    use_penalty = (i >= schedule.warmup * schedule.steps).astype(jnp.float32)
    rec_nearest, nearest_error = drift_scale
    drift = (schedule.w_error * rec_nearest * kernel_drift(rounded, kernels, nearest_error)
             if schedule.w_error else 0.0)
    return rec + drift + use_penalty * schedule.penalty * penalty

  x = jnp.where(jax.random.bernoulli(key, schedule.quantized_input, x.shape), x, x_fp)
  updates, opt_state = schedule.optimizer().update(jax.grad(loss)(learned, x), opt_state,
                                                   learned)
  return optax.apply_updates(learned, updates), opt_state


def learn_rounding(unit, frozen, sites: dict, x: jax.Array, x_fp: jax.Array, target: jax.Array,
                   weights: jax.Array, cfg: ml_collections.ConfigDict, key: jax.Array,
                   act_paths=()):
  """`({kernel path: rounded kernel}, {path: SiteQuant}, {"before", "after", "drift"})`: the
  kernels of `sites` (paths in `frozen`'s params) rounded so that the unit's output from `x`
  matches `target`; the sites whose steps were learned, with those steps — the activation sites
  `act_paths` (paths in `frozen`'s QuantParams; when `cfg.act_scale_lr` > 0) and the kernels'
  (paths in its params; when `cfg.w_scale_lr` > 0); the weighted mean squared error (hard
  rounding, from `x`) before (nearest rounding, the search's steps) and after; and the result's
  `kernel_drift` (1: nearest rounding's kernel error). Each step's input takes each element from
  `x` with probability `cfg.quantized_input`, else from `x_fp`."""
  flat_params = _flat(frozen[0])
  kernels = {path: flat_params[path] for path in sites}
  schedule = Schedule.of(cfg)
  view = lambda path: kernels[path].reshape(-1, sites[path].scale.shape[-1])
  act_sites = flatten(frozen[1])
  learned = dict(
      logits={path: adaround.init_logits(view(path), sites[path].scale) for path in kernels},
      log_scales={path: jnp.zeros_like(act_sites[path].scale)
                  for path in (act_paths if cfg.act_scale_lr > 0 else ())},
      w_log_scales={path: jnp.zeros_like(sites[path].scale)
                    for path in (kernels if cfg.w_scale_lr > 0 else ())})
  nearest = {path: sites[path](view(path)).reshape(kernels[path].shape) for path in kernels}
  before = float(_error(unit, frozen, nearest, x, target, weights))
  drift_scale = (jnp.float32(before * np.prod(target.shape[1:])),  # per image, as `_step`'s
                 {path: jnp.maximum(jnp.sum(jnp.square(nearest[path] - kernels[path])), 1e-30)
                  for path in kernels})
  opt_state = schedule.optimizer().init(learned)
  n = x.shape[0]
  batch = cfg.batch_size or n
  batch_key, drop_key = jax.random.split(key)
  for i in range(cfg.steps):
    idx = (jax.random.choice(jax.random.fold_in(batch_key, i), n, (batch,), replace=False)
           if batch < n else slice(None))
    learned, opt_state = _step(unit, schedule, learned, opt_state, jnp.asarray(i, jnp.float32),
                               frozen, kernels, sites, x[idx], x_fp[idx], target[idx],
                               weights[idx], jax.random.fold_in(drop_key, i), drift_scale)
  rounded = jax.tree_util.tree_map(np.asarray, _rounded(kernels, learned["logits"], sites, True,
                                                        learned["w_log_scales"]))
  quant = _rescaled(frozen[1], learned["log_scales"])
  after = float(_error(unit, (frozen[0], quant), rounded, x, target, weights))
  drift = float(kernel_drift(rounded, kernels, drift_scale[1]))
  learned_sites = {path: site for path, site in flatten(quant).items()
                   if path in learned["log_scales"]}
  learned_sites.update({path: _step_times_exp(sites[path], log_scale)
                        for path, log_scale in learned["w_log_scales"].items()})
  learned_sites = jax.tree_util.tree_map(np.asarray, learned_sites)
  return rounded, learned_sites, dict(before=before, after=after, drift=drift)


def _without(qparams: dict, sites: dict) -> dict:
  """`qparams` less `sites`: while learning, the soft kernels are not quantized again."""
  return unflatten({p: s for p, s in flatten(qparams).items() if p not in sites})


def reconstruct_embedding(model, params: dict, qparams: dict, images: jax.Array,
                          cfg: ml_collections.ConfigDict, key: jax.Array):
  """The patch embedding's kernel rounded so that its output (site `patch_embed`) on the
  (quantized) images matches the float model's: `learn_rounding`'s result (no activation step
  learned)."""
  sites = {p: s for p, s in flatten(qparams).items() if p == EMBEDDING_KERNEL}
  target = patch_embedding(model, {"params": params}, images)
  return learn_rounding(EmbeddingUnit(model), (params, _without(qparams, sites)), sites, images,
                        images, target, jnp.ones(target.shape), cfg, key)


def patch_embedding(model, variables: dict, images: jax.Array) -> jax.Array:
  """The patch embedding's output (the `patch_embed` site's value) of `images`."""
  _, state = model.apply(variables, images, mutable=[OBSERVE])
  return state[OBSERVE]["patch_embed"][0]


def head_weight_sites(qparams: dict) -> Dict[str, object]:
  """`{param path: SiteQuant}` of the quantized kernels after the encoder (pre_logits, head)."""
  return {path: site for path, site in flatten(qparams).items()
          if path.startswith(HEAD_PREFIXES) and site.kind == WEIGHT}


def reconstruct_head(model, params: dict, qparams: dict, images: jax.Array,
                     target: jax.Array, cfg: ml_collections.ConfigDict, key: jax.Array):
  """The head's kernels rounded so that the quantized model's logits of `images` (every earlier
  unit as it stands in `params`) match the float model's `target`: `learn_rounding`'s result."""
  sites = head_weight_sites(qparams)
  return learn_rounding(LogitsUnit(model), (params, _without(qparams, sites)), sites, images,
                        images, target, jnp.ones(target.shape), cfg, key)


def reconstruct_block(model, params: dict, qparams: dict, block: int, block_in: jax.Array,
                      fp_block_in: jax.Array, target: jax.Array, weights: jax.Array,
                      cfg: ml_collections.ConfigDict, key: jax.Array):
  """Block `block`'s kernels rounded (and activation steps learned) so that its output from the
  stream `block_in` (and `fp_block_in`, see `learn_rounding`) matches `target`:
  `learn_rounding`'s result, the kernels and sites named by their paths in the whole model's
  params and QuantParams."""
  sites = block_weight_sites(qparams, block)
  prefix = f"{ENCODER}/{block_name(block)}/"
  if not (cfg.share_programs and blocks_share_a_program(model, qparams)):
    return learn_rounding(ModelBlockUnit(model, block), (params, _without(qparams, sites)),
                          sites, block_in, fp_block_in, target, weights, cfg, key,
                          block_activation_paths(qparams, prefix))
  local = {path[len(prefix):]: site for path, site in sites.items()}
  quant = _without(block_sites(qparams, block), local)
  rounded, learned_sites, errors = learn_rounding(
      SharedBlockUnit(model.block_module()), (params[ENCODER][block_name(block)], quant), local,
      block_in, fp_block_in, target, weights, cfg, key, block_activation_paths(quant))
  return ({prefix + path: kernel for path, kernel in rounded.items()},
          {prefix + path: site for path, site in learned_sites.items()}, errors)


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
  """`(params, qparams, history)`: `params` with the patch embedding's, every block's and (with
  `cfg.head`) the head's kernels rounded by AdaRound on `images` (first to last), `qparams` with
  the learned steps (`cfg.act_scale_lr`, `cfg.w_scale_lr` > 0; else as given), and per unit the
  reconstruction error before and after."""
  validate(cfg)
  fp_params = params
  fp_block_in, targets = _streams(model, params, {}, images)  # the float model's, once
  key = jax.random.PRNGKey(cfg.seed)
  weights = error_weights(model, params, images, cfg.loss, targets)
  history = []

  def take(unit_name, result):
    nonlocal params, qparams
    rounded, learned_sites, errors = result
    params = flax.traverse_util.unflatten_dict(dict(_flat(params), **rounded), sep="/")
    qparams = unflatten(dict(flatten(qparams), **learned_sites))
    history.append(dict(block=unit_name, **errors))
    logging.info("reconstruct %s: error %.4g -> %.4g", f"block {unit_name}" if isinstance(
        unit_name, int) else f"the {unit_name}", errors["before"], errors["after"])

  if cfg.embedding and EMBEDDING_KERNEL in flatten(qparams):  # before any block: float params
    take("embedding", reconstruct_embedding(model, params, qparams, images, cfg,
                                            jax.random.fold_in(key, -1 % 2**31)))
  for block in range(model.num_layers if cfg.blocks else 0):
    block_in = _streams(model, params, qparams, images)[0]  # earlier units rounded
    take(block, reconstruct_block(model, params, qparams, block, block_in[block],
                                  fp_block_in[block], targets[block], weights[block], cfg,
                                  jax.random.fold_in(key, block)))
  if cfg.head and head_weight_sites(qparams):
    take("head", reconstruct_head(model, params, qparams, images,
                                  model.apply({"params": fp_params}, images), cfg,
                                  jax.random.fold_in(key, -2 % 2**31)))
  return params, qparams, history
