"""CLAMP-ViT on ImageNet for Swin-T (timm swin_tiny_patch4_window7_224: .safetensors or .npz, either
timm layout), with the paper's schedule and the generator's learning rate 0.25.

  python launch.py --config=configs/swin_t.py[:w8a8|w4a8|w4a4|mp|minmax] --workdir=runs/swin_t \
      --config.model.checkpoint=PATH --config.data.dir=IMAGENET_VAL_DIR
"""

from configs.common import imagenet_config


def get_config(arg: str = ""):
  return imagenet_config("Swin-T", preset="deit", arg=arg)
