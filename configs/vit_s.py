"""CLAMP-ViT on ImageNet for ViT-S/16 (google-research/vision_transformer or big_vision .npz), with the paper's schedule.

  python launch.py --config=configs/vit_s.py[:w8a8|w4a8|mp] --workdir=runs/vit_s \
      --config.model.checkpoint=PATH --config.data.dir=IMAGENET_VAL_DIR
"""

from configs.common import imagenet_config


def get_config(arg: str = ""):
  return imagenet_config("ViT-S/16", preset="vit", arg=arg)
