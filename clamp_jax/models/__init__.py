"""ViT/DeiT and Swin models, presets, the model factory and checkpoint import."""

from clamp_jax.models.presets import PRESETS, build_model, model_config, model_family
from clamp_jax.models.swin import SWIN_PRESETS, SwinTransformer, swin_config
from clamp_jax.models.vit import VisionTransformer, quant_site
