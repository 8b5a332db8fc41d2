"""Stage 1 of CLAMP-ViT: optimise a generator's images against the float model P (and the
quantized model Q), with one jitted optax step; warm-started refreshes for the CLAMP cycle."""

import functools
import time
from typing import Any, Optional, Tuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from clamp_jax.generate import losses
from clamp_jax.generate.config import uses_q, validate
from clamp_jax.generate.generator import augment, make_generator, roll_pixels
from clamp_jax.models.quantized import calibrate


@flax.struct.dataclass
class GenState:
  """What a refresh continues from: the generator's parameters and each image's target class."""
  gen_params: Any
  targets: jax.Array


def learning_rates(gen_cfg: ml_collections.ConfigDict, steps: int) -> np.ndarray:
  """Each step's learning rate: linear warm-up over `warmup_steps` (at most half the run), then
  cosine decay to 0 (`lr` for pixels, `conv_lr` for the conv generator's weights)."""
  lr = gen_cfg.conv_lr if gen_cfg.generator == "conv" else gen_cfg.lr
  warmup = min(gen_cfg.warmup_steps, steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, 1))
  return np.asarray(schedule(np.arange(steps)), np.float32)


def make_loss(config: ml_collections.ConfigDict, model: nn.Module):
  """`loss_fn(x, images, targets, params, qparams) -> (loss, terms)` of `config.generate.method`.

  `x` is what the models see (augmented), `images` the un-augmented images (for TV). Terms with
  weight 0 are not computed. `terms` holds each unweighted term and P's logits on `x`.
  """
  gen_cfg = config.generate
  grids = model.block_grids(config.model.image_size)  # each block's token grid
  use_pse = gen_cfg.method == "psaq" and gen_cfg.w_pse > 0

  def loss_fn(x, images, targets, params, qparams):
    logits, fp = model.apply({"params": params}, x, return_intermediates=True)
    terms = {"logits": logits}
    loss = 0.0
    if uses_q(gen_cfg):
      q_logits, q = model.apply({"params": params, "quant": qparams}, x,
                                return_intermediates=True)
      if gen_cfg.w_contrast > 0:
        terms["contrast"] = losses.blocks_contrastive_loss(
            q["attn"], fp["attn"], grids, gen_cfg.neighbourhood, gen_cfg.positives, gen_cfg.tau)
        loss += gen_cfg.w_contrast * terms["contrast"]
      if gen_cfg.w_disagree > 0:
        terms["disagree"] = losses.logits_kl(logits, q_logits)
        loss -= gen_cfg.w_disagree * terms["disagree"]
    if use_pse:
      terms["pse"] = losses.blocks_similarity_entropy(fp["attn"], grids)
      loss -= gen_cfg.w_pse * terms["pse"]
    if gen_cfg.w_ce > 0:
      terms["ce"] = losses.target_cross_entropy(logits, targets)
      loss += gen_cfg.w_ce * terms["ce"]
    if gen_cfg.w_tv > 0:
      terms["tv"] = losses.total_variation(images)
      loss += gen_cfg.w_tv * terms["tv"]
    return loss, terms

  return loss_fn


@functools.lru_cache(maxsize=8)
def _compiled(model: nn.Module, frozen: ml_collections.FrozenConfigDict):
  """`(generator, tx, step)` for one model and config, cached so that every run and refresh reuses
  the compiled step. The learning rate is an argument (not a schedule inside `tx`), so the run
  length does not change the program. The step donates the generator's params and the optimizer
  state (its first two arguments): each update is written over the last."""
  config = ml_collections.ConfigDict(frozen)
  gen_cfg = config.generate
  generator = make_generator(config)
  tx = optax.scale_by_adam(b1=gen_cfg.b1, b2=gen_cfg.b2)
  loss_fn = make_loss(config, model)
  max_roll = roll_pixels(config.model.image_size, gen_cfg.roll_fraction)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(gen_params, opt_state, targets, params, qparams, key, i, lr, train):
    """One Adam update on augmented images; with `train` False the same program evaluates the
    un-augmented images (its update is then discarded). Returns the rendered images too."""
    def objective(gp):
      images = generator.render(gp, targets)
      x = augment(jax.random.fold_in(key, i), images, max_roll, gen_cfg.flip)
      loss, terms = loss_fn(jnp.where(train, x, images), images, targets, params, qparams)
      return loss, (terms, images)

    (loss, (terms, images)), grads = jax.value_and_grad(objective, has_aux=True)(gen_params)
    updates, opt_state = tx.update(grads, opt_state)
    updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
    gen_params = generator.project(optax.apply_updates(gen_params, updates))
    return gen_params, opt_state, loss, terms, images

  return generator, tx, step


def generate(config: ml_collections.ConfigDict, model: nn.Module, params, qparams,
             key: Optional[jax.Array] = None, init_state: Optional[GenState] = None,
             steps: Optional[int] = None) -> Tuple[jax.Array, jax.Array, GenState, dict]:
  """Synthesises `config.generate.num_images` images: `(images, targets, state, report)`.

  `model`: ours, or a foreign linen ViT as a `models.foreign.ForeignViT`. `qparams`: Q's
  `QuantParams` (the anchors of the contrastive loss; a foreign model's from `calibrate_layers`);
  None calibrates Q with `config.quant` on the initial images (the min-max initialised model;
  our models only); unused by `psaq` and when `w_contrast` and `w_disagree` are 0. `key`: None uses
  `config.generate.seed`. `init_state` (a previous `state`) warm-starts a refresh with a fresh
  optimizer; `steps` defaults to `steps` for a first generation and `refresh_steps` for a refresh.
  `images` are the final un-augmented images, inside the valid normalised range.
  Report: `misprediction_rate` and `target_accuracy` (P's argmax vs target, percent),
  `final_loss` and `final_terms` (on the final un-augmented images), `loss_curve` (every step's
  loss, augmented), `steps_per_second` (steps after the first, compiled one; nan below 2 steps).
  """
  gen_cfg = config.generate
  validate(gen_cfg)
  if steps is None:
    steps = gen_cfg.steps if init_state is None else gen_cfg.refresh_steps
  if steps < 0:
    raise ValueError(f"steps={steps} must be >= 0")
  if key is None:
    key = jax.random.PRNGKey(gen_cfg.seed)
  k_init, k_targets, k_steps = jax.random.split(key, 3)
  frozen = ml_collections.FrozenConfigDict(
      {"generate": config.generate, "model": config.model, "data": config.data})
  generator, tx, step = _compiled(model, frozen)
  state = init_state
  if state is None:
    targets = jax.random.randint(k_targets, (gen_cfg.num_images,), 0, config.model.num_classes)
    state = GenState(generator.init(k_init), targets)
  elif state.targets.shape != (gen_cfg.num_images,):
    raise ValueError(f"init_state holds {state.targets.shape[0]} images, "
                     f"config.generate.num_images={gen_cfg.num_images}")
  if not uses_q(gen_cfg):
    qparams = {}
  elif qparams is None:
    qparams = calibrate(model, params, generator.render(state.gen_params, state.targets),
                        config.quant)
  run = functools.partial(step, targets=state.targets, params=params, qparams=qparams,
                          key=k_steps)

  own = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)  # what the step may donate
  gen_params, opt_state, curve = own(state.gen_params), tx.init(state.gen_params), []
  lrs = learning_rates(gen_cfg, steps)
  log_every = max(1, steps // 10)
  t0 = t1 = time.perf_counter()
  for i in range(steps):
    gen_params, opt_state, loss, _, _ = run(gen_params, opt_state, i=i, lr=lrs[i], train=True)
    curve.append(loss)
    if i == 0:
      jax.block_until_ready(loss)
      t1 = time.perf_counter()
    if init_state is None and ((i + 1) % log_every == 0 or i + 1 == steps):  # refreshes: one
      # line each, by their caller
      logging.info("generate (%s, %s): step %d/%d  loss %.4f  %.0fs", gen_cfg.method,
                   gen_cfg.generator, i + 1, steps, float(loss), time.perf_counter() - t0)
  curve = [float(v) for v in jax.device_get(curve)]
  rate = (steps - 1) / (time.perf_counter() - t1) if steps >= 2 else float("nan")

  _, _, loss, terms, images = run(own(gen_params), opt_state, i=steps, lr=np.float32(0),
                                  train=False)
  accuracy = 100.0 * float(jnp.mean(jnp.argmax(terms.pop("logits"), -1) == state.targets))
  report = dict(misprediction_rate=100.0 - accuracy, target_accuracy=accuracy,
                final_loss=float(loss), final_terms={k: float(v) for k, v in terms.items()},
                loss_curve=curve, steps_per_second=rate, steps=steps)
  return images, state.targets, GenState(gen_params, state.targets), report
