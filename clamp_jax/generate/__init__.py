"""Stage 1: data-free generation of calibration images (CLAMP-ViT patch-contrastive, PSAQ-ViT)."""

from clamp_jax.generate.config import generate_config, validate
from clamp_jax.generate.generator import (Generator, augment, make_generator, roll_pixels,
                                          valid_range)
from clamp_jax.generate.grid import image_grid, save_png_grid
from clamp_jax.generate.losses import (blocks_contrastive_loss, blocks_similarity_entropy,
                                       contrastive_terms, drop_prefix, logits_kl, neighbourhood,
                                       patch_contrastive_loss, patch_similarity_entropy,
                                       target_cross_entropy, total_variation)
from clamp_jax.generate.loop import GenState, generate, learning_rates, make_loss
