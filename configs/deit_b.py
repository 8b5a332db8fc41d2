"""CLAMP-ViT on ImageNet for DeiT-B (timm deit_base_patch16_224 .safetensors), with the paper's schedule.

  python launch.py --config=configs/deit_b.py[:w8a8|w4a8|mp] --workdir=runs/deit_b \
      --config.model.checkpoint=PATH --config.data.dir=IMAGENET_VAL_DIR
"""

from configs.common import imagenet_config


def get_config(arg: str = ""):
  return imagenet_config("DeiT-B", preset="deit", arg=arg)
