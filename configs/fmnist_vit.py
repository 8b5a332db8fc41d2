"""The offline default: the CLAMP cycle on a 6-block ViT (width 96, patch 4) on Fashion-MNIST.

  python launch.py --config=configs/fmnist_vit.py --workdir=runs/fmnist          # W8/A8, full cycle
  python launch.py --config=configs/fmnist_vit.py:w4a8 --workdir=runs/fmnist_w4a8
  python launch.py --config=configs/fmnist_vit.py --mode=eval --workdir=runs/fmnist_eval
  python launch.py --config=configs/fmnist_vit.py --mode=train --workdir=runs/fmnist_train

Arguments (after a colon, comma-separated): a bit preset `w8a8` (default), `w6a6`, `w4a8`,
`w4a4`, `w3a8`, `w3a4`, `w4a3`, `w3a3`, `w2a8` (protocol `config.quant.sites`, `matmul`); `mp` searches mixed precision within the uniform W4/A8 model's size (starting from
`w4a8` unless a bit preset is given); `minmax` turns the search and the rounding reconstruction
off (min-max calibration on the generated images only; the full cycle reconstructs the weights'
rounding after the search at <= 3-bit weights, `config.reconstruct`); `paper` uses the paper's schedule (10 passes, 50-step refreshes) instead
of the reduced one that fits 2 CPU cores; `tiny` shrinks model and schedule for tests.
"""

import os

import ml_collections

from clamp_jax.generate import generate_config
from clamp_jax.models import model_config
from clamp_jax.search import search_config
from configs.common import parse_args, quant_from_args, reconstruct_from_args

REFERENCE_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    "checkpoints", "fmnist_vit.npz")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = parse_args(arg, flags=("tiny", "minmax", "paper"))
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.distributed = False  # True: jax.distributed.initialize() first (multi-host)
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
  config.calib = ml_collections.ConfigDict(dict(source="clamp", num_images=32, seed=0))
  config.quant = quant_from_args(args)
  config.generate = generate_config()
  config.search = search_config(enabled="minmax" not in args)
  config.reconstruct = reconstruct_from_args(args, config.quant)
  if "paper" not in args:  # reduced schedule: the full cycle in under 15 minutes on 2 CPU cores
    config.generate.update(refresh_steps=25)
    config.search.update(passes=3)
  if "tiny" in args:
    config.model.update(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, patch_size=7)
    config.train.update(epochs=1, batch_size=64, eval_every=0)
    config.eval.update(batch_size=100, num_images=200)
    config.calib.num_images = 8
    config.generate.update(steps=4, refresh_steps=2, warmup_steps=1)
    config.search.update(passes=1, generations=2, population=4, children=4, tournament=3)
    config.reconstruct.steps = 4
  return config
