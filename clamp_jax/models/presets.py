"""Named model shapes (ViT-Ti/S/B/L, patch 16 or 32; DeiT-T/S/B) and the model factory, which
builds the family `config.model.family` names (`vit` when absent, or `swin`)."""

import flax.linen as nn
import ml_collections

from clamp_jax.models.swin import build_swin
from clamp_jax.models.vit import VisionTransformer, compute_dtype

# width, depth, heads, mlp width
_SIZES = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}


def _vit(size: str, patch: int, gelu_approximate: bool) -> dict:
  width, depth, heads, mlp = _SIZES[size]
  return dict(patch_size=patch, hidden_size=width, num_layers=depth, num_heads=heads,
              mlp_dim=mlp, image_size=224, num_classes=1000, pool="tok",
              layernorm_epsilon=1e-6, gelu_approximate=gelu_approximate)


# vision_transformer uses flax's tanh-approximate GELU; timm (DeiT) uses the exact one.
PRESETS = {
    **{f"ViT-{s}/{p}": _vit(s, p, gelu_approximate=True) for s in _SIZES for p in (16, 32)},
    "DeiT-T": _vit("Ti", 16, gelu_approximate=False),
    "DeiT-S": _vit("S", 16, gelu_approximate=False),
    "DeiT-B": _vit("B", 16, gelu_approximate=False),
}

ARCH_FIELDS = ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim",
               "num_classes", "pool", "representation_size", "layernorm_epsilon",
               "gelu_approximate")


def model_config(name: str = "", **overrides) -> ml_collections.ConfigDict:
  """A `config.model` section: the preset `name` (or no preset), then `overrides`."""
  if name and name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  fields = dict(name=name, image_size=224, channels=3, patch_size=16, hidden_size=768,
                num_layers=12, num_heads=12, mlp_dim=3072, num_classes=1000, pool="tok",
                representation_size=0, layernorm_epsilon=1e-6, gelu_approximate=False,
                compute_dtype="float32",  # the matmuls' operands: "bfloat16" on GPU/TPU is faster
                checkpoint="",
                quantized="")  # a run's quantized.npz: --mode=eval evaluates it instead
  fields.update(PRESETS.get(name, {}))
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(fields)}")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


FAMILIES = ("vit", "swin")


def model_family(cfg: ml_collections.ConfigDict) -> str:
  """`config.model.family`: "vit" (also when the section has no such field) or "swin"."""
  family = cfg.get("family", "vit")
  if family not in FAMILIES:
    raise ValueError(f"config.model.family={family!r}; known: {list(FAMILIES)}")
  return family


def build_model(cfg: ml_collections.ConfigDict) -> nn.Module:
  """The Flax module described by a `config.model` section (a ViT or, by its family, a Swin)."""
  if model_family(cfg) == "swin":
    return build_swin(cfg)
  return VisionTransformer(**{k: cfg[k] for k in ARCH_FIELDS if k != "representation_size"},
                           representation_size=cfg.representation_size or None,
                           compute_dtype=compute_dtype(cfg))
