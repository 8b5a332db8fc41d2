"""HuggingFace transformers' FlaxViTForImageClassification through `models.intercept` (skipped
without transformers, which is not in the `test` extra: `pip install "transformers>=4.57,<5"`).
Everything runs jitted: eager dispatch of these small models is several times slower."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models import build_model
from clamp_jax.models.intercept import Rule, apply_quantized_layers, calibrate_layers
from clamp_jax.models.quantized import calibrate, quant_config
from clamp_jax.quant.params import LOG_SQRT2, UNIFORM
from clamp_jax.search import search_config, search_layers
from clamp_jax.search.fitness import output_loss
from conftest import ROOT, tiny_model_config

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(ROOT, "bench"))
from hf_vit import hf_vit  # noqa: E402

LAYERS = 2


def random_like(shapes, seed=0):
  """`shapes` (an `eval_shape` tree) filled from N(0, 0.2^2). At 0.5 the attention is so peaked
  that log-sqrt(2)'s levels, sqrt(2) apart at any bits, move the logits by 10%."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(scale=0.2, size=a.shape), jnp.float32), shapes)


def calibrated(module, variables, rules, images):
  """`calibrate_layers`, jitted: `(qparams, report)` (the report is filled while tracing)."""
  reports = []

  def calibrate_fn(v, x):
    qparams, report = calibrate_layers(module, v, rules, x)
    reports.append(report)
    return qparams
  return jax.jit(calibrate_fn)(variables, images), reports[0]


def logits_fn(module, variables, images):
  """`qparams -> logits` of the HF model quantized by `qparams` (`{}`: float), jitted."""
  return jax.jit(lambda q: apply_quantized_layers(module, variables, q, images).logits)


@pytest.fixture(scope="module")
def hf():
  """A random small HF ViT (its linen module, NHWC images), its variables, images."""
  config = transformers.ViTConfig(
      hidden_size=16, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=32,
      image_size=16, patch_size=4, num_channels=3, num_labels=5)
  module = transformers.FlaxViTForImageClassification(config, _do_init=False).module
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  return module, random_like(jax.eval_shape(module.init, jax.random.PRNGKey(0), images)), images


def test_layers_and_attention_matmuls_found_and_8_bits_close_to_float(hf):
  module, variables, images = hf
  qparams, report = calibrated(module, variables, [Rule(".*", w_bits=8, a_bits=8)], images)
  matmuls = sorted(k for k in qparams if "/matmul_" in k)
  assert matmuls == [f"vit/encoder/layer/{i}/attention/attention/matmul_{j}"
                     for i in range(LAYERS) for j in (0, 1)]
  assert len(qparams) - len(matmuls) == 6 * LAYERS + 2  # q, k, v, out, fc1, fc2; patches, head
  assert not report.unmatched_layers and not report.unused_rules
  for name in matmuls:  # q x k: both uniform; probs x v: the probabilities log-sqrt(2)
    lhs = LOG_SQRT2 if name.endswith("matmul_1") else UNIFORM
    assert (qparams[name]["lhs"].quantizer, qparams[name]["rhs"].quantizer) == (lhs, UNIFORM)
  logits = logits_fn(module, variables, images)
  fp, q8 = logits({}), logits(qparams)
  assert 0 < float(jnp.abs(q8 - fp).max()) < 0.02 * float(jnp.abs(fp).max())


def test_search_layers_no_worse_than_its_start(hf):
  module, variables, images = hf
  start, _ = calibrated(module, variables, [Rule(".*", w_bits=4, a_bits=4)], images)
  cfg = search_config(passes=1, generations=2, population=4, children=4, tournament=3)
  found, [entry] = search_layers(module, variables, start, images, cfg,
                                 output_fn=lambda out: out.logits)
  logits = logits_fn(module, variables, images)
  fitness = lambda q: float(output_loss(logits(q), logits({}), cfg.output_loss, cfg.temperature))
  scores = [fitness(start), fitness(found)]
  np.testing.assert_allclose(scores, [entry["fitness_before"], entry["fitness_after"]], rtol=1e-3)
  assert scores[1] <= scores[0]


def test_converted_vit_equals_ours_float_and_quantized():
  """`bench/hf_vit.py`: our ViT's weights in HF's; at W4/A4, our `matmul` protocol without the
  reparameterization and with min-max ranges is the same model as `calibrate_layers`' with the
  image at `image_bits`."""
  model_cfg = tiny_model_config(gelu_approximate=False)
  ours, images = build_model(model_cfg), jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3))
  params = random_like(jax.eval_shape(ours.init, jax.random.PRNGKey(0), images))["params"]
  module, variables = hf_vit(model_cfg, params)
  qcfg = quant_config(w_bits=4, a_bits=4, reparam=False, a_observer="minmax")
  rules = [Rule(r"patch_embeddings/projection$", w_bits=4, a_bits=qcfg.image_bits),
           Rule(".*", w_bits=4, a_bits=4)]
  qparams, _ = calibrated(module, variables, rules, images)
  ours_logits = jax.jit(lambda q: ours.apply({"params": params, "quant": q}, images))
  logits = logits_fn(module, variables, images)
  np.testing.assert_allclose(logits({}), ours_logits({}), atol=1e-5)
  ours_qparams = jax.jit(lambda p, x: calibrate(ours, p, x, qcfg))(params, images)
  np.testing.assert_allclose(logits(qparams), ours_logits(ours_qparams), atol=1e-5)
