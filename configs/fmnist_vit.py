"""The offline default: a 6-block ViT (width 96, patch 4) on Fashion-MNIST (28x28x1).

  python launch.py --config=configs/fmnist_vit.py --mode=eval --workdir=runs/fmnist
  python launch.py --config=configs/fmnist_vit.py --mode=train --workdir=runs/fmnist_train

  python launch.py --config=configs/fmnist_vit.py:w4a8 --workdir=runs/fmnist_w4a8

Arguments (after a colon, comma-separated): a bit preset `w8a8` (default), `w6a6`, `w4a8`,
`w4a4`; `mp` searches mixed precision within the uniform W4/A8 model's size (starting from
`w4a8` unless a bit preset is given; the search is enabled); `tiny` shrinks model and schedule
for tests.
"""

import os

import ml_collections

from clamp_jax.generate import generate_config
from clamp_jax.models import model_config
from clamp_jax.models.quantized import quant_config
from clamp_jax.search import search_config

REFERENCE_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    "checkpoints", "fmnist_vit.npz")


BIT_PRESETS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a8": (4, 8), "w4a4": (4, 4)}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = {a for a in arg.split(",") if a}
  unknown = args - {"tiny", "mp"} - set(BIT_PRESETS)
  if unknown:
    raise ValueError(f"unknown config arguments {sorted(unknown)}; "
                     f"known: {['mp', 'tiny'] + sorted(BIT_PRESETS)}")
  bits = [BIT_PRESETS[a] for a in args if a in BIT_PRESETS]
  if len(bits) > 1:
    raise ValueError(f"give at most one bit preset, got {sorted(args & set(BIT_PRESETS))}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = model_config(
      image_size=28, channels=1, patch_size=4, hidden_size=96, num_layers=6, num_heads=3,
      mlp_dim=192, num_classes=10, pool="tok", gelu_approximate=False,
      checkpoint=os.path.normpath(REFERENCE_CHECKPOINT))
  config.data = ml_collections.ConfigDict(dict(
      name="fashion_mnist", dir="", mean=0.2860, std=0.3530, preset="", tfds_name=""))
  config.train = ml_collections.ConfigDict(dict(
      epochs=20, batch_size=128, lr=1e-3, warmup_steps=500, weight_decay=0.05,
      grad_clip=1.0, label_smoothing=0.1, augment_pad=2, augment_flip=True, eval_every=2,
      init_checkpoint=""))  # fine-tune from this float checkpoint instead of a random init
  config.eval = ml_collections.ConfigDict(dict(batch_size=500, num_images=0, split=""))
  config.calib = ml_collections.ConfigDict(dict(source="real", num_images=32, seed=0))
  w_bits, a_bits = bits[0] if bits else BIT_PRESETS["w4a8" if "mp" in args else "w8a8"]
  config.quant = quant_config(w_bits=w_bits, a_bits=a_bits, mixed="mp" in args)
  config.generate = generate_config()  # used by config.calib.source=psaq|clamp
  # A reduced schedule for 2 CPU cores (the paper: 10 passes); on with --config.search.enabled=True.
  config.search = search_config(passes=2, enabled="mp" in args)
  if "tiny" in args:
    config.model.update(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, patch_size=7)
    config.train.update(epochs=1, batch_size=64, eval_every=0)
    config.eval.update(batch_size=100, num_images=200)
    config.calib.num_images = 8
    config.generate.update(steps=4, refresh_steps=2, warmup_steps=1)
    config.search.update(passes=1, generations=2, population=4, children=4, tournament=3)
  return config
