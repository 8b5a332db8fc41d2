"""CLAMP-ViT on ImageNet for DeiT-S (timm deit_small_patch16_224 .safetensors), with the paper's schedule.

  python launch.py --config=configs/deit_s.py[:w8a8|w4a8|mp] --workdir=runs/deit_s \
      --config.model.checkpoint=PATH --config.data.dir=IMAGENET_VAL_DIR
"""

from configs.common import imagenet_config


def get_config(arg: str = ""):
  return imagenet_config("DeiT-S", preset="deit", arg=arg)
