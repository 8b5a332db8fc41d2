"""CLAMP-ViT on ImageNet for Swin-S (timm swin_small_patch4_window7_224: .safetensors or .npz,
either timm layout), with the paper's schedule and the generator's learning rate 0.25.

  python launch.py --config=configs/swin_s.py[:w8a8|w4a8|w4a4|mp|minmax] --workdir=runs/swin_s \
      --config.model.checkpoint=PATH --config.data.dir=IMAGENET_VAL_DIR
"""

from configs.common import imagenet_config


def get_config(arg: str = ""):
  return imagenet_config("Swin-S", preset="deit", arg=arg)
