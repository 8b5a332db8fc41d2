"""`config.model.compute_dtype`: the matmuls' operands in bfloat16, everything else float32."""

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from clamp_jax.models import build_model
from clamp_jax.models.quantized import calibrate, quant_config
from clamp_jax.models.swin import swin_config
from clamp_jax.validate import validate_run
from conftest import random_images, random_params, tiny_model_config

SWIN = dict(image_size=32, channels=3, patch_size=2, embed_dim=8, depths=(2, 2),
            num_heads=(2, 2), window_size=4, mlp_ratio=2.0, num_classes=4)
CONFIGS = {"vit": tiny_model_config, "swin": lambda **kw: swin_config(**SWIN, **kw)}


def equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside it (pjit, custom_jvp, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from equations(sub)


@pytest.fixture(params=sorted(CONFIGS))
def models(request):
  """`(float32 model, bfloat16 model, params, images)` of one family."""
  make = CONFIGS[request.param]
  cfg = make()
  return (build_model(cfg), build_model(make(compute_dtype="bfloat16")), random_params(cfg),
          jnp.asarray(random_images(cfg, n=4)))


def test_bfloat16_runs_every_matmul_on_bfloat16_operands_into_float32(models):
  f32, bf16, params, x = models
  qparams = calibrate(f32, params, x, quant_config(w_bits=4, a_bits=4))
  variables = {"params": params, "quant": qparams}
  for model, dtype in ((f32, jnp.float32), (bf16, jnp.bfloat16)):
    eqns = list(equations(jax.make_jaxpr(model.apply)(variables, x).jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == dtype for e in dots for v in e.invars)
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in dots)
    rounds = [e for e in eqns if e.primitive.name == "round"]  # the quantizers' arithmetic
    assert rounds and all(e.invars[0].aval.dtype == jnp.float32 for e in rounds)


def test_bfloat16_logits_stay_near_the_float32_ones(models):
  f32, bf16, params, x = models
  for quant in ({}, calibrate(f32, params, x, quant_config(w_bits=8, a_bits=8))):
    want = f32.apply({"params": params, "quant": quant}, x)
    got = bf16.apply({"params": params, "quant": quant}, x)
    assert got.dtype == jnp.float32
    err = float(jnp.abs(got - want).max())
    assert 0 < err < 0.05 * float(jnp.abs(want).max())  # rounded, but only at bfloat16's 2^-8


def test_unknown_compute_dtype_is_named_before_any_work():
  cfg = tiny_model_config(compute_dtype="float16")
  with pytest.raises(ValueError, match="compute_dtype='float16'.*bfloat16"):
    build_model(cfg)
  from configs.fmnist_vit import get_config
  config = get_config("")
  config.model.compute_dtype = "half"
  with pytest.raises(ValueError, match="config.model.compute_dtype='half'"):
    validate_run(config, "quantize")
