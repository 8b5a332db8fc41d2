"""The offline Swin: the CLAMP cycle on a 2-stage Swin (patch 2, width 48, depths (2, 2), heads
(3, 6), window 7) on Fashion-MNIST.

  python launch.py --config=configs/fmnist_swin.py --workdir=runs/fmnist_swin    # W8/A8, full cycle
  python launch.py --config=configs/fmnist_swin.py:w4a8 --workdir=runs/fmnist_swin_w4a8
  python launch.py --config=configs/fmnist_swin.py --mode=eval --workdir=runs/fmnist_swin_eval
  python launch.py --config=configs/fmnist_swin.py --mode=train --workdir=runs/fmnist_swin_train

The same arguments as `configs/fmnist_vit.py` (a bit preset, `mp`, `minmax`, `paper`, `tiny`).
The model's shape is read from the checkpoint (a timm Swin file); the fields below are what
`--mode=train` builds. The generator's learning rate is 0.25 (PSAQ-ViT's and the paper's for Swin).
"""

import os

import ml_collections

from clamp_jax.models import swin_config
from configs.common import FMNIST_FLAGS, fmnist_config, parse_args

REFERENCE_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                    "checkpoints", "fmnist_swin.safetensors")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  model = swin_config(
      image_size=28, channels=1, patch_size=2, embed_dim=48, depths=(2, 2), num_heads=(3, 6),
      window_size=7, mlp_ratio=4.0, num_classes=10,
      checkpoint=os.path.normpath(REFERENCE_CHECKPOINT))
  return fmnist_config(model, parse_args(arg, flags=FMNIST_FLAGS), tiny_model=dict(
      embed_dim=8, num_heads=(2, 2), mlp_ratio=2.0), train_epochs=10)
