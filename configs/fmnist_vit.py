"""The offline default: the CLAMP cycle on a 6-block ViT (width 96, patch 4) on Fashion-MNIST.

  python launch.py --config=configs/fmnist_vit.py --workdir=runs/fmnist          # W8/A8, full cycle
  python launch.py --config=configs/fmnist_vit.py:w4a8 --workdir=runs/fmnist_w4a8
  python launch.py --config=configs/fmnist_vit.py --mode=eval --workdir=runs/fmnist_eval
  python launch.py --config=configs/fmnist_vit.py --mode=train --workdir=runs/fmnist_train

Arguments (after a colon, comma-separated): a bit preset `w8a8` (default), `w6a6`, `w4a8`,
`w4a4`, `w3a8`, `w3a4`, `w4a3`, `w3a3`, `w2a8` (protocol `config.quant.sites`, `matmul`); `mp` searches mixed precision within the uniform W4/A8 model's size (starting from
`w4a8` unless a bit preset is given); `minmax` turns the search and the rounding reconstruction
off (min-max calibration on the generated images only; the full cycle reconstructs the weights'
rounding after the search at <= 4-bit weights and >= 4-bit activations, `config.reconstruct`); `paper` uses the paper's schedule (10 passes, 50-step refreshes) instead
of the reduced one that fits 2 CPU cores; `tiny` shrinks model and schedule for tests.
"""

import os

import ml_collections

from clamp_jax.models import model_config
from configs.common import FMNIST_FLAGS, fmnist_config, parse_args

REFERENCE_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    "checkpoints", "fmnist_vit.npz")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  model = model_config(
      image_size=28, channels=1, patch_size=4, hidden_size=96, num_layers=6, num_heads=3,
      mlp_dim=192, num_classes=10, pool="tok", gelu_approximate=False,
      checkpoint=os.path.normpath(REFERENCE_CHECKPOINT))
  return fmnist_config(model, parse_args(arg, flags=FMNIST_FLAGS), tiny_model=dict(
      hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, patch_size=7))
