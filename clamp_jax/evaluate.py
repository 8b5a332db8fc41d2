"""Top-1 accuracy of a model on the evaluation split of `config.data`."""

import functools
import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clamp_jax import data as data_lib

EVAL_SPLIT = {"fashion_mnist": "test", "folder": "validation", "tfds": "validation"}
PROGRESS_SECONDS = 30.0  # a long evaluation prints its progress at most this often


@functools.partial(jax.jit, static_argnums=0)
def predict(model: nn.Module, variables, images: jax.Array) -> jax.Array:
  """The model's argmax class; compiled once per model (a hashable module) and input shape."""
  return jnp.argmax(model.apply(variables, images), axis=-1)


def predictor(model: nn.Module):
  """`predict` bound to `model`; a module that cannot be hashed (a field holding a dict) gets
  its own jitted function, compiled on each call of `evaluate_params`."""
  try:
    hash(model)
  except TypeError:
    return jax.jit(lambda variables, images: jnp.argmax(model.apply(variables, images), axis=-1))
  return functools.partial(predict, model)


def evaluate_params(config: ml_collections.ConfigDict, model: nn.Module, params,
                    extra_variables=None) -> dict:
  """`{"top1": percent, "n": images, "seconds": s}` on the evaluation split.

  `config.eval.split` overrides the split; `config.eval.num_images` > 0 evaluates only that many.
  Every batch is padded to `config.eval.batch_size`, so the forward compiles once. An evaluation
  that runs longer than `PROGRESS_SECONDS` logs a progress line at most that often.
  """
  variables = {"params": params, **(extra_variables or {})}
  apply = predictor(model)
  split = config.eval.split or EVAL_SPLIT[config.data.name]
  bs = config.eval.batch_size
  correct = n = 0
  t0 = last_line = time.time()
  for images, labels in data_lib.batches(config.data, split, bs, config.model.image_size,
                                         config.eval.num_images):
    b = len(labels)
    if b < bs:
      images = np.concatenate([images, np.zeros((bs - b,) + images.shape[1:], images.dtype)])
    pred = np.asarray(apply(variables, images))[:b]
    correct += int((pred == labels).sum())
    n += b
    if time.time() - last_line >= PROGRESS_SECONDS:
      last_line = time.time()
      logging.info("evaluating: %d images so far, top-1 %.2f%%  %.0fs", n, 100.0 * correct / n,
                   last_line - t0)
  if n == 0:
    raise ValueError(f"the {split!r} split of {config.data.name!r} holds no images")
  return {"top1": 100.0 * correct / n, "n": n, "seconds": time.time() - t0}
