"""Generators behind one interface, and the per-step augmentation.

A `Generator` is three pure functions: `init(key) -> gen_params`, `render(gen_params, targets)
-> images [B, H, W, C]` (always inside the valid normalised range) and `project(gen_params)`,
applied after every optimizer update. Images live in the model's normalised input space, whose
valid range is `[(0 - mean) / std, (1 - mean) / std]` per channel.
"""

import math
from typing import Any, Callable, NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clamp_jax.data.preprocess import channel_stats

GENERATORS = ("pixels", "conv")


class Generator(NamedTuple):
  init: Callable[[jax.Array], Any]
  render: Callable[[Any, jax.Array], jax.Array]
  project: Callable[[Any], Any]


def valid_range(config: ml_collections.ConfigDict) -> Tuple[np.ndarray, np.ndarray]:
  """`(lo, hi)`, each `[C]`: the normalised values of pixel 0 and pixel 1 (`config.data` stats)."""
  c = config.model.channels
  mean = channel_stats(config.data.mean, c, "mean")
  std = channel_stats(config.data.std, c, "std")
  if np.any(std <= 0):
    raise ValueError(f"config.data.std must be positive, got {config.data.std!r}")
  return (0.0 - mean) / std, (1.0 - mean) / std


def _conv_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """flax's default LeCun normal for a `(kh, kw, in, out)` kernel, drawn as its
  `(kh * kw * in, out)` matrix (the same fan-in, so the same distribution): XLA compiles the 2-D
  draw far faster on CPU."""
  flat = (int(np.prod(shape[:-1])), shape[-1])
  return nn.initializers.lecun_normal()(key, flat, dtype).reshape(shape)


class ConvGenerator(nn.Module):
  """Noise times the target class's embedding -> dense to a `ceil(size / 4)` map of `width`
  channels -> twice (GroupNorm, x2 nearest upsampling, 3x3 conv, leaky ReLU) -> 3x3 conv to the
  image channels, cropped to `image_size`, tanh scaled to `[lo, hi]` per channel."""
  image_size: int
  channels: int
  num_classes: int
  lo: Tuple[float, ...]
  hi: Tuple[float, ...]
  width: int = 64

  @nn.compact
  def __call__(self, noise: jax.Array, targets: jax.Array) -> jax.Array:
    side = math.ceil(self.image_size / 4)
    h = noise * nn.Embed(self.num_classes, noise.shape[-1], name="embed")(targets)
    h = nn.Dense(side * side * self.width, name="dense")(h).reshape(-1, side, side, self.width)
    for i, width in enumerate((self.width, self.width // 2)):
      h = nn.GroupNorm(num_groups=8, name=f"norm_{i}")(h)
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2 upsampling
      h = nn.leaky_relu(nn.Conv(width, (3, 3), kernel_init=_conv_init, name=f"conv_{i}")(h), 0.2)
    h = nn.Conv(self.channels, (3, 3), kernel_init=_conv_init, name="to_image")(h)
    h = h[:, :self.image_size, :self.image_size]
    lo, hi = np.asarray(self.lo, np.float32), np.asarray(self.hi, np.float32)
    return lo + (hi - lo) * 0.5 * (jnp.tanh(h) + 1.0)


def make_generator(config: ml_collections.ConfigDict, latent_dim: int = 64) -> Generator:
  """The generator `config.generate.generator` for `config.generate.num_images` images.

  `pixels`: the parameters are the images, initialised N(0, 1), clipped into the valid range by
  `render` and by `project`. `conv`: `ConvGenerator`'s weights plus a fixed noise input per image
  (kept in `gen_params["noise"]`, behind `stop_gradient`, so the optimizer never moves it).
  """
  gen_cfg, model_cfg = config.generate, config.model
  lo, hi = valid_range(config)
  b, s, c = gen_cfg.num_images, model_cfg.image_size, model_cfg.channels
  clip = lambda x: jnp.clip(x, lo, hi)
  if gen_cfg.generator == "pixels":
    # drawn flat and reshaped (the same values): XLA compiles the flat draw much faster on CPU
    init = lambda key: jax.random.normal(key, (b * s * s * c,)).reshape(b, s, s, c)
    return Generator(init=init, render=lambda pixels, targets: clip(pixels), project=clip)
  if gen_cfg.generator == "conv":
    net = ConvGenerator(s, c, model_cfg.num_classes, tuple(lo.tolist()), tuple(hi.tolist()))

    @jax.jit
    def init(key):
      k_noise, k_net = jax.random.split(key)
      noise = jax.random.normal(k_noise, (b, latent_dim))
      return {"net": net.init(k_net, noise, jnp.zeros((b,), jnp.int32))["params"],
              "noise": noise}

    def render(gen_params, targets):
      return net.apply({"params": gen_params["net"]},
                       jax.lax.stop_gradient(gen_params["noise"]), targets)

    return Generator(init=init, render=render, project=lambda gen_params: gen_params)
  raise ValueError(f"config.generate.generator={gen_cfg.generator!r}; known: {list(GENERATORS)}")


def roll_pixels(image_side: int, roll_fraction: float) -> int:
  """The largest roll: `round(image_side * roll_fraction)`, at least 1; 0 when the fraction is 0."""
  return max(1, round(image_side * roll_fraction)) if roll_fraction > 0 else 0


def augment(key: jax.Array, images: jax.Array, max_roll: int, flip: bool) -> jax.Array:
  """Per image: a cyclic roll by up to `+-max_roll` pixels on each spatial axis, and with
  `flip` a horizontal flip with probability 1/2. Values are only moved, so they stay in range."""
  k_roll, k_flip = jax.random.split(key)
  if max_roll:
    shifts = jax.random.randint(k_roll, (images.shape[0], 2), -max_roll, max_roll + 1)
    images = jax.vmap(lambda img, sh: jnp.roll(img, (sh[0], sh[1]), axis=(0, 1)))(images, shifts)
  if flip:
    mask = jax.random.bernoulli(k_flip, 0.5, (images.shape[0],))
    images = jnp.where(mask[:, None, None, None], images[:, :, ::-1], images)
  return images
