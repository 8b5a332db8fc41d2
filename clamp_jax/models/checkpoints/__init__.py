"""Checkpoint import (vision_transformer / big_vision `.npz`, timm `.safetensors` or `.npz`) and export."""

from clamp_jax.models.checkpoints.formats import BIG_VISION, TIMM, VIT_JAX, detect_format
from clamp_jax.models.checkpoints.loader import (CheckpointMismatchError, load_checkpoint,
                                                 read_flat, save_vit_npz)
