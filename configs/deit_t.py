"""CLAMP-ViT on ImageNet for DeiT-T (timm deit_tiny_patch16_224 .safetensors), with the paper's schedule.

  python launch.py --config=configs/deit_t.py[:w8a8|w4a8|mp] --workdir=runs/deit_t \
      --config.model.checkpoint=PATH --config.data.dir=IMAGENET_VAL_DIR
"""

from configs.common import imagenet_config


def get_config(arg: str = ""):
  return imagenet_config("DeiT-T", preset="deit", arg=arg)
