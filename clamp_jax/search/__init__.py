"""Layer-wise evolutionary search of quantization parameters (stage 2 of CLAMP-ViT), the
optional block-wise rounding reconstruction after it, and `search_layers` for any linen model
quantized by `models.intercept`."""

from clamp_jax.search.evaluator import BlockEvaluator, Caches, population_mesh, with_block
from clamp_jax.search.budget import Budget
from clamp_jax.search.layers import LayersEvaluator, search_layers
from clamp_jax.search.loop import search, search_config
from clamp_jax.search.mixed import MixedEvolQ
from clamp_jax.search.reconstruct import reconstruct, reconstruct_config
from clamp_jax.search.strategy import EvolQ, EvoState
