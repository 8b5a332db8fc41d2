"""ViT/DeiT models, presets and checkpoint import."""

from clamp_jax.models.presets import PRESETS, build_model, model_config
from clamp_jax.models.vit import VisionTransformer, quant_site
