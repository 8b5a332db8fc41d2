"""clamp_jax: data-free post-training quantization of vision transformers (CLAMP-ViT) in JAX/Flax."""

__version__ = "0.1.0"
