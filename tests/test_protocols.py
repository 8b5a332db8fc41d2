"""Protocols of config.quant.sites, the bit presets, and the RepQ-ViT reparameterization of the ViT."""

import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax import data as data_lib
from clamp_jax.data.preprocess import normalize
from clamp_jax.models import build_model
from clamp_jax.models.checkpoints import load_checkpoint
from clamp_jax.models.quantized import calibrate, quant_config
from clamp_jax.models.reparam import FOLDS, calibrate_model, fold, reparam_factors
from clamp_jax.quant import params as qp
from clamp_jax.search.budget import Budget
from configs import fmnist_vit
from configs.common import BIT_PRESETS, parse_args, quant_from_args
from conftest import random_images, random_params, tiny_model_config

BLOCK = "Transformer/encoderblock_0/"
ATTN = BLOCK + "MultiHeadDotProductAttention_0/"


@pytest.fixture(scope="module")
def tiny():
  cfg = tiny_model_config(num_layers=2)
  model = build_model(cfg)
  return cfg, model, random_params(cfg), jnp.asarray(random_images(cfg, n=4))


def activation_names(qparams):
  return {path for path, _ in qp.iter_sites(qparams, qp.ACTIVATION)}


def test_matmul_protocol_quantizes_exactly_the_matmul_inputs(tiny):
  cfg, model, params, images = tiny
  qparams = calibrate(model, params, images, quant_config(w_bits=4, a_bits=4))
  want = {"image", "head_in"}
  for i in range(cfg.num_layers):
    block = f"Transformer/encoderblock_{i}/"
    attn = block + "MultiHeadDotProductAttention_0/"
    want |= {block + "ln1", block + "ln2", block + "MlpBlock_0/gelu"}
    want |= {attn + s for s in ("q", "k", "v", "attn_probs", "attn_v")}
  assert activation_names(qparams) == want  # no residual stream, logits or LN/softmax inputs
  sites = dict(qp.iter_sites(qparams))
  probs = sites[ATTN + "attn_probs"]
  assert probs.quantizer == qp.LOG_SQRT2 and float(probs.bits) == 4
  assert float(sites["head/kernel"].bits) == 4 and float(sites["embedding/kernel"].bits) == 4
  assert float(sites["image"].bits) == 8 and float(sites["head_in"].bits) == 4


def test_all_protocol_adds_the_residual_stream_at_residual_bits(tiny):
  _, model, params, images = tiny
  matmul = calibrate(model, params, images, quant_config(a_bits=4))
  everything = dict(qp.iter_sites(calibrate(model, params, images,
                                            quant_config(sites="all", a_bits=4, residual_bits=8))))
  added = set(activation_names(everything)) - activation_names(matmul)
  assert {"Transformer/posembed", BLOCK + "residual1", BLOCK + "residual2", "logits",
          ATTN + "attn_logits", ATTN + "attn_out", "patch_embed"} <= added
  assert "head_in" not in everything  # the paper's release has no such site
  assert float(everything[BLOCK + "residual1"].bits) == 8
  assert float(everything[BLOCK + "ln1"].bits) == 4


@pytest.mark.parametrize("field,value", [("sites", "some"), ("softmax", "log3"),
                                         ("gelu", "relu"), ("residual_bits", 1)])
def test_unknown_protocol_and_quantizer_values_are_named(tiny, field, value):
  _, model, params, images = tiny
  with pytest.raises(ValueError, match=f"config.quant.{field}"):
    calibrate(model, params, images, quant_config(**{field: value}))


def test_ptf_needs_the_all_protocol(tiny):
  _, model, params, images = tiny
  with pytest.raises(ValueError, match="ptf.*sites='all'"):
    calibrate(model, params, images, quant_config(ptf=True))


def test_twin_gelu_and_log2_softmax_options(tiny):
  _, model, params, images = tiny
  sites = dict(qp.iter_sites(calibrate(model, params, images, quant_config(
      a_bits=4, gelu="twin", softmax="log2", softmax_bits=3))))
  assert sites[BLOCK + "MlpBlock_0/gelu"].quantizer == qp.TWIN
  assert sites[ATTN + "attn_probs"].quantizer == qp.LOG2
  assert float(sites[ATTN + "attn_probs"].bits) == 3


@pytest.mark.parametrize("preset", sorted(BIT_PRESETS))
def test_bit_presets_use_the_matmul_protocol(preset):
  qcfg = quant_from_args(parse_args(preset))
  assert (qcfg.w_bits, qcfg.a_bits) == BIT_PRESETS[preset]
  assert qcfg.sites == "matmul" and qcfg.softmax == "log_sqrt2" and qcfg.reparam
  assert fmnist_vit.get_config(preset).quant.to_dict() == qcfg.to_dict()


def test_reparameterized_float_model_equals_the_original(tiny):
  cfg, model, params, images = tiny
  factors = reparam_factors(model, params, images, quant_config(a_bits=4))
  assert set(factors) == {f"Transformer/encoderblock_{i}/{s}"
                          for i in range(cfg.num_layers) for s in FOLDS}
  assert all(np.ptp(f["r"]) > 0 for f in factors.values())  # a real, non-trivial fold
  folded = fold(params, factors)
  x = jnp.asarray(random_images(cfg, n=6, seed=9))
  np.testing.assert_allclose(model.apply({"params": folded}, x),
                             model.apply({"params": params}, x), atol=1e-5, rtol=1e-5)


def test_reparameterized_site_is_per_tensor_on_the_common_grid(tiny):
  _, model, params, images = tiny
  _, qparams, factors = calibrate_model(model, params, images, quant_config(a_bits=4))
  site = dict(qp.iter_sites(qparams))[BLOCK + "ln1"]
  assert site.scale.shape == () and site.zero_point.shape == ()
  np.testing.assert_allclose(site.scale, factors[BLOCK + "ln1"]["scale"])
  assert float(site.zero_point) == float(np.round(site.zero_point))


def test_fold_names_missing_params(tiny):
  _, model, params, images = tiny
  factors = reparam_factors(model, params, images, quant_config())
  broken = dict(params, Transformer=dict(params["Transformer"]))
  block = dict(broken["Transformer"]["encoderblock_0"])
  del block["LayerNorm_0"]
  broken["Transformer"]["encoderblock_0"] = block
  with pytest.raises(ValueError, match="encoderblock_0/ln1.*LayerNorm_0/scale"):
    fold(broken, factors)


def with_outlier_channels(params, channels, factor):
  """A function-preserving transform: LN channels scaled up by `factor`, the rows of the linears
  that read them scaled down (post-LayerNorm outliers as ImageNet ViTs have them)."""
  out = {"Transformer": dict(params["Transformer"])}
  out.update({k: v for k, v in params.items() if k != "Transformer"})
  for name, block in params["Transformer"].items():
    if not name.startswith("encoderblock_"):
      continue
    block = {k: dict(v) for k, v in block.items()}
    for site, (norm, linears) in FOLDS.items():
      ln = block[norm]
      ln["scale"] = ln["scale"].at[channels].multiply(factor)
      ln["bias"] = ln["bias"].at[channels].multiply(factor)
      for linear in linears:
        module, layer = linear.split("/")
        block[module] = {k: dict(v) if isinstance(v, dict) else v for k, v in block[module].items()}
        block[module][layer] = dict(block[module][layer])
        block[module][layer]["kernel"] = block[module][layer]["kernel"].at[channels].divide(factor)
    out["Transformer"][name] = block
  return out


@pytest.fixture(scope="module")
def reference():
  """The committed reference model and 300 test images (a real, trained model is needed for
  accuracy to mean something)."""
  config = fmnist_vit.get_config("w4a4")
  model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
  images, labels = data_lib.load_arrays(config.data, "test")
  images = normalize(images[:300], config.data.mean, config.data.std)
  calib = normalize(data_lib.load_arrays(config.data, "train")[0][:32], config.data.mean,
                    config.data.std)
  return config, build_model(model_cfg), params, images, labels[:300], calib


def accuracy(model, params, qparams, images, labels):
  logits = model.apply({"params": params, "quant": qparams}, images)
  return 100.0 * float(np.mean(np.argmax(logits, -1) == labels))


def test_reparameterization_rescues_post_layernorm_outlier_channels(reference):
  config, model, params, images, labels, calib = reference
  outliers = with_outlier_channels(params, jnp.array([3, 17, 40]), 40.0)
  np.testing.assert_allclose(model.apply({"params": outliers}, images[:8]),
                             model.apply({"params": params}, images[:8]), atol=2e-4)
  plain_cfg = config.quant.copy_and_resolve_references()
  plain_cfg.reparam = False

  def top1(p, qcfg):
    folded, qparams, _ = calibrate_model(model, p, calib, qcfg)
    return accuracy(model, folded, qparams, images, labels)

  clean = top1(params, config.quant)
  assert top1(outliers, plain_cfg) < clean - 20  # per-tensor 4 bits fails on the outliers
  assert top1(outliers, config.quant) > clean - 3  # reparameterized, it comes back


def test_matmul_protocol_keeps_the_reference_model_at_w4a4(reference):
  config, model, params, images, labels, calib = reference
  fp = accuracy(model, params, {}, images, labels)
  everything = config.quant.copy_and_resolve_references()
  everything.sites = "all"
  folded, qparams, _ = calibrate_model(model, params, calib, config.quant)
  folded_all, qparams_all, _ = calibrate_model(model, params, calib, everything)
  assert accuracy(model, folded, qparams, images, labels) > fp - 6
  assert accuracy(model, folded_all, qparams_all, images, labels) < fp - 20  # the residual stream



def test_mixed_precision_with_a_preset_is_budgeted_against_that_preset(tiny):
  _, model, params, images = tiny
  qcfg = quant_from_args(parse_args("mp,w4a4"))
  assert (qcfg.mixed, qcfg.w_bits, qcfg.a_bits) == (True, 4, 4)
  assert (qcfg.budget_w_bits, qcfg.budget_a_bits, qcfg.budget_kind) == (4, 4, "both")
  qparams = calibrate(model, params, images, qcfg)
  budget = Budget.from_config(qparams, qcfg)
  assert budget.allows(qparams)  # the uniform preset is exactly on budget
  assert not budget.allows(calibrate(model, params, images, quant_config(w_bits=4, a_bits=5)))
  assert quant_from_args(parse_args("mp")).budget_a_bits == 8  # alone: W4/A8's size, as before
