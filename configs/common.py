"""Pieces every config shares: the `:ARG` parser, bit presets, the Fashion-MNIST cycle around a
model (`fmnist_config`) and the ImageNet model configs (`imagenet_config`).

An ImageNet config is `get_config(arg)` in `configs/NAME.py`, one line over `imagenet_config`;
arguments after the colon, comma-separated: a bit preset (`w8a8`, `w6a6`, `w4a8`, `w4a4`,
`w3a8`, `w3a4`, `w4a3`, `w3a3`, `w2a8`; all in the `matmul` protocol of `config.quant.sites`),
`mp` (mixed precision under the uniform W4/A8 model's size, search on; with a bit preset, from
that preset and under its own size and BOPs), `minmax` (no search:
min-max calibration on the generated images only).
"""

import ml_collections

from clamp_jax.data.folder import IMAGENET_MEAN, IMAGENET_STD
from clamp_jax.generate import generate_config
from clamp_jax.models import SWIN_PRESETS, model_config, model_family, swin_config
from clamp_jax.models.quantized import quant_config
from clamp_jax.search import reconstruct_config, search_config

BIT_PRESETS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4), "w3a8": (3, 8),
               "w3a4": (3, 4), "w4a3": (4, 3), "w3a3": (3, 3), "w2a8": (2, 8)}
MIXED_START = "w4a8"  # mixed precision starts from, and is budgeted against, uniform W4/A8

SWIN_GENERATOR_LR = 0.25  # the generator's learning rate for a Swin (PSAQ-ViT, the paper)
FMNIST_FLAGS = ("tiny", "minmax", "paper")

# (normalisation mean, std) of each evaluation preset of clamp_jax.data.folder
PRESET_STATS = {"deit": (list(IMAGENET_MEAN), list(IMAGENET_STD)), "vit": (0.5, 0.5)}


def parse_args(arg: str, flags=()) -> set:
  """The comma-separated arguments after the colon; raises ValueError naming unknown ones."""
  args = {a for a in arg.split(",") if a}
  known = set(BIT_PRESETS) | {"mp"} | set(flags)
  unknown = args - known
  if unknown:
    raise ValueError(f"unknown config arguments {sorted(unknown)}; known: {sorted(known)}")
  presets = sorted(args & set(BIT_PRESETS))
  if len(presets) > 1:
    raise ValueError(f"give at most one bit preset, got {presets}")
  return args


def quant_from_args(args: set, **overrides) -> ml_collections.ConfigDict:
  """`config.quant` for the bit preset in `args` (default W8/A8). `mp` alone: mixed precision
  from W4/A8 within its size; `mp` with a preset: from the preset, within its size and BOPs."""
  named = args & set(BIT_PRESETS)
  name = next(iter(named)) if named else (MIXED_START if "mp" in args else "w8a8")
  w_bits, a_bits = BIT_PRESETS[name]
  if "mp" in args and named:  # budgeted against the preset's own uniform model
    # trades on the sensitivity table with weights of at least 3 bits: held-in top-1 at W4/A4
    # on two models, 3 seeds, BENCHMARKS.md "Mixed precision: trades from the preset's bits"
    overrides = dict(dict(budget_w_bits=w_bits, budget_a_bits=a_bits, budget_kind="both",
                          a_bits_min=min(a_bits, 4), w_bits_min=min(w_bits, 3),
                          mp_start="trades"), **overrides)
  return quant_config(w_bits=w_bits, a_bits=a_bits, mixed="mp" in args, **overrides)


# The rounding reconstruction is on by default at weights of at most RECONSTRUCT_MAX_W_BITS and
# activations of at least RECONSTRUCT_MIN_A_BITS (held-in top-1, BENCHMARKS.md: +2.8 at W3/A4,
# +1.0 / +2.0 at W4/A4 on the two models; -6.4 at W4/A3).
RECONSTRUCT_MAX_W_BITS = 4
RECONSTRUCT_MIN_A_BITS = 4
# It fits on the search's 32 final images and this many fresh ones: at W3/A4 on three models
# (held-in, 3-6 seeds) +0.24 / +1.15 / +0.93 over the 32 alone, where it over-fitted
# (BENCHMARKS.md "More images for the reconstruction").
RECONSTRUCT_EXTRA_IMAGES = 96
# The head's kernels are rounded too (against the float model's logits) at weights of at most
# this many bits: at W2/A8 +1.16 / +0.41 / +0.21 on three models, all 12 seeds up; level at W3/A4
# (+0.07), so not spent there (BENCHMARKS.md "The head reconstructed at 2-bit weights").
RECONSTRUCT_HEAD_MAX_W_BITS = 2


def reconstruct_from_args(args: set, quant: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.reconstruct`: on for the full cycle at low-bit weights and at least 4-bit
  activations (`RECONSTRUCT_MAX_W_BITS`, `RECONSTRUCT_MIN_A_BITS`), off with `minmax`; with
  `RECONSTRUCT_EXTRA_IMAGES` images of its own; the head included at weights of at most
  `RECONSTRUCT_HEAD_MAX_W_BITS`."""
  return reconstruct_config(
      enabled="minmax" not in args and quant.w_bits <= RECONSTRUCT_MAX_W_BITS
      and quant.a_bits >= RECONSTRUCT_MIN_A_BITS, extra_images=RECONSTRUCT_EXTRA_IMAGES,
      head=quant.w_bits <= RECONSTRUCT_HEAD_MAX_W_BITS)


# The generator: `conv` where the rounding reconstruction runs, which carries its gain (held-in,
# BENCHMARKS.md "The convolutional generator where the reconstruction runs: the new default");
# `pixels` elsewhere, where its ~2.6x longer generation bought nothing measured.
def generate_for(model: ml_collections.ConfigDict, reconstruct: ml_collections.ConfigDict,
                 **overrides) -> ml_collections.ConfigDict:
  """`config.generate` for `model` (a Swin's learning rate is `SWIN_GENERATOR_LR`) and the cycle's
  `reconstruct` section (the `conv` generator where it is enabled), then `overrides`."""
  defaults = dict(generator="conv" if reconstruct.enabled else "pixels")
  if model_family(model) == "swin":
    defaults.update(lr=SWIN_GENERATOR_LR)
  return generate_config(**dict(defaults, **overrides))


def calib_config() -> ml_collections.ConfigDict:
  """`config.calib`: 32 images from the CLAMP generator; with `source="real"` they are drawn
  from `split` (a slice such as `train[:30000]` keeps held-in images out of the calibration)."""
  return ml_collections.ConfigDict(dict(source="clamp", num_images=32, seed=0, split="train"))


def fmnist_config(model: ml_collections.ConfigDict, args: set, tiny_model: dict,
                  train_epochs: int = 20) -> ml_collections.ConfigDict:
  """The CLAMP cycle on Fashion-MNIST around `model` (its `config.model`), from the parsed
  `args`: a bit preset, `mp`, `minmax`; `paper`: the paper's schedule (10 passes, 50-step
  refreshes) instead of the reduced one that fits 2 CPU cores; `tiny`: the model shrunk by
  `tiny_model` and the schedule for tests and smoke runs. `--mode=train` trains
  `train_epochs` epochs."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.distributed = False  # True: jax.distributed.initialize() first (multi-host)
  config.compilation_cache = ""  # a folder: compiled programs kept there for later runs
  config.model = model
  config.data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", dir="", mean=0.2860, std=0.3530, preset="", tfds_name=""))
  config.train = ml_collections.ConfigDict(dict(
      epochs=train_epochs, batch_size=128, lr=1e-3, warmup_steps=500, weight_decay=0.05,
      grad_clip=1.0, label_smoothing=0.1, augment_pad=2, augment_flip=True, eval_every=2,
      init_checkpoint=""))  # fine-tune from this float checkpoint instead of a random init
  config.eval = ml_collections.ConfigDict(dict(batch_size=500, num_images=0, split=""))
  config.calib = calib_config()
  config.quant = quant_from_args(args)
  config.reconstruct = reconstruct_from_args(args, config.quant)
  config.generate = generate_for(model, config.reconstruct)
  config.search = search_config(enabled="minmax" not in args)
  if "paper" not in args:  # reduced schedule: the full cycle in under 15 minutes on 2 CPU cores
    config.generate.update(refresh_steps=25)
    config.search.update(passes=3)
  if "tiny" in args:
    config.model.update(tiny_model)
    config.train.update(epochs=1, batch_size=64, eval_every=0)
    config.eval.update(batch_size=100, num_images=200)
    config.calib.num_images = 8
    config.generate.update(steps=4, refresh_steps=2, warmup_steps=1)
    config.search.update(passes=1, generations=2, population=4, children=4, tournament=3)
    config.reconstruct.update(steps=4, extra_images=4)
  return config


def imagenet_config(model_name: str, preset: str, arg: str = "") -> ml_collections.ConfigDict:
  """The full CLAMP cycle with the paper's schedule for the preset `model_name` (a ViT/DeiT of
  `PRESETS` or a Swin of `SWIN_PRESETS`) on ImageNet.

  Set `config.model.checkpoint` (a vision_transformer/big_vision `.npz` or timm `.safetensors`;
  a timm Swin file for a Swin) and `config.data.dir` (an ImageNet validation folder of class
  sub-folders), e.g.
  `--config.model.checkpoint=deit_small_patch16_224.safetensors --config.data.dir=/data/imagenet`.
  """
  args = parse_args(arg, flags=("minmax",))
  mean, std = PRESET_STATS[preset]
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.distributed = False  # True: jax.distributed.initialize() first (multi-host TPU/GPU)
  config.compilation_cache = ""  # a folder: compiled programs kept there for later runs
  config.model = swin_config(model_name) if model_name in SWIN_PRESETS else model_config(model_name)
  config.data = ml_collections.ConfigDict(dict(
      name="folder", dir="", mean=mean, std=std, preset=preset, tfds_name=""))
  config.eval = ml_collections.ConfigDict(dict(batch_size=250, num_images=0, split=""))
  config.calib = calib_config()
  config.quant = quant_from_args(args)
  # The paper's schedule: 500 steps of generation, 50-step refreshes, P = 10, C = 6, K = 15.
  config.reconstruct = reconstruct_from_args(args, config.quant)
  config.generate = generate_for(config.model, config.reconstruct, steps=500, refresh_steps=50)
  config.search = search_config(enabled="minmax" not in args)
  return config
