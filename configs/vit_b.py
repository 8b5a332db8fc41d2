"""CLAMP-ViT on ImageNet for ViT-B/16 (google-research/vision_transformer or big_vision .npz), with the paper's schedule.

  python launch.py --config=configs/vit_b.py[:w8a8|w4a8|mp] --workdir=runs/vit_b \
      --config.model.checkpoint=PATH --config.data.dir=IMAGENET_VAL_DIR
"""

from configs.common import imagenet_config


def get_config(arg: str = ""):
  return imagenet_config("ViT-B/16", preset="vit", arg=arg)
