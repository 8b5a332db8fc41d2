"""Pure-function quantizers (no Flax modules): uniform and log2 fake quantization with a
straight-through gradient, observers, integer export, and `QuantParams` trees of `SiteQuant`."""

from clamp_jax.quant.log2 import log2_fake_quant
from clamp_jax.quant.params import SiteQuant
from clamp_jax.quant.uniform import fake_quant
