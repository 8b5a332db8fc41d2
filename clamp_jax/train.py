"""Float training of a ViT or Swin with optax (used for the Fashion-MNIST reference models),
resumable with orbax."""

import os
import time

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from clamp_jax import data as data_lib
from clamp_jax.data.preprocess import channel_stats
from clamp_jax.evaluate import evaluate_params
from clamp_jax.models import build_model, model_family
from clamp_jax.models.checkpoints import load_checkpoint, save_vit_npz
from clamp_jax.models.checkpoints.swin_timm import save_timm_swin


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


def augment(key: jax.Array, images: jax.Array, pad: int, flip: bool) -> jax.Array:
  """Random translation by up to `pad` pixels (zero fill) and random horizontal flip, per image."""
  b, h, w, _ = images.shape
  k_shift, k_flip = jax.random.split(key)
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * pad + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    mask = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    images = jnp.where(mask, images[:, :, ::-1], images)
  return images


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  warmup = min(cfg.warmup_steps, total_steps // 2)
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, total_steps)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.model` on `config.data`; writes `workdir/params.npz` (vision_transformer
  format; a Swin's in timm's layout)."""
  cfg = config.train
  model = build_model(config.model)
  images_u8, labels = data_lib.load_arrays(config.data, "train")
  c = images_u8.shape[-1]
  mean = channel_stats(config.data.mean, c, "mean")
  std = channel_stats(config.data.std, c, "std")
  steps_per_epoch = len(images_u8) // cfg.batch_size
  total_steps = steps_per_epoch * cfg.epochs
  tx = make_optimizer(cfg, total_steps)

  rng = jax.random.PRNGKey(config.seed)
  params = model.init(rng, jnp.zeros((1,) + images_u8.shape[1:], jnp.float32))["params"]
  if cfg.init_checkpoint:  # fine-tune: start from these weights (same shape as config.model)
    _, params = load_checkpoint(cfg.init_checkpoint, config.model)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

  @jax.jit
  def train_step(state, batch_u8, batch_labels):
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), state.step)
    x = augment(key, batch_u8.astype(jnp.float32) / 255.0, cfg.augment_pad, cfg.augment_flip)
    x = (x - mean) / std

    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      targets = optax.smooth_labels(jax.nn.one_hot(batch_labels, logits.shape[-1]),
                                    cfg.label_smoothing)
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), loss

  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "train_state")),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2))
  start_epoch = 0
  if manager.latest_step() is not None:
    start_epoch = manager.latest_step()
    state = manager.restore(start_epoch, args=ocp.args.StandardRestore(state))
    logging.info("resumed training from epoch %d", start_epoch)

  t0 = time.time()
  for epoch in range(start_epoch, cfg.epochs):
    order = np.random.default_rng([config.seed, epoch]).permutation(len(images_u8))
    losses = []
    for i in range(steps_per_epoch):
      idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
      state, loss = train_step(state, images_u8[idx], labels[idx])
      losses.append(loss)
    manager.save(epoch + 1, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    msg = (f"epoch {epoch + 1}/{cfg.epochs}  loss {float(np.mean(jax.device_get(losses))):.4f}  "
           f"elapsed {time.time() - t0:.0f}s")
    if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0:
      msg += f"  test top-1 {evaluate_params(config, model, state.params)['top1']:.2f}%"
    logging.info(msg)
    print(msg, flush=True)

  out = os.path.join(workdir, "params.npz")
  save = save_timm_swin if model_family(config.model) == "swin" else save_vit_npz
  save(out, jax.device_get(state.params))
  result = evaluate_params(config, model, state.params)
  result.update(checkpoint=out, train_seconds=time.time() - t0, epochs=cfg.epochs)
  return result
