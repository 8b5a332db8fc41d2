"""The quantized ViT: QuantParams as data (jit once, vmap many), calibration options, export, orbax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models import build_model
from clamp_jax.models.quantized import (calibrate, dequantized_params, export_integer, observe,
                                        quant_config)
from clamp_jax.quant import params as qp
from conftest import random_images, random_params


@pytest.fixture
def setup(tiny_cfg):
  model = build_model(tiny_cfg)
  params = random_params(tiny_cfg)
  images = jnp.asarray(random_images(tiny_cfg, n=4))
  return model, params, images


def run(model, params, qparams, images):
  return model.apply({"params": params, "quant": qparams}, images)


def test_no_sites_gives_the_float_logits_exactly(setup):
  model, params, images = setup
  np.testing.assert_array_equal(run(model, params, {}, images),
                                model.apply({"params": params}, images))


def test_every_site_of_the_algorithm_is_calibrated_in_protocol_all(setup, tiny_cfg):
  model, params, images = setup
  sites = dict(qp.iter_sites(calibrate(model, params, images,
                                       quant_config(sites="all", softmax="float"))))
  per_block = {"ln1", "q", "k", "v", "attn_logits", "attn_v", "attn_out", "residual1", "ln2",
               "gelu", "fc2", "residual2"}
  kernels = {"MultiHeadDotProductAttention_0/" + p + "/kernel" for p in ("query", "key", "value", "out")}
  kernels |= {"MlpBlock_0/Dense_0/kernel", "MlpBlock_0/Dense_1/kernel"}
  want = {"image", "patch_embed", "embedding/kernel", "Transformer/posembed",
          "Transformer/encoder_norm_out", "head/kernel", "logits"}
  for i in range(tiny_cfg.num_layers):
    block = f"Transformer/encoderblock_{i}/"
    want |= {block + k for k in kernels}
    want |= {block + ("MultiHeadDotProductAttention_0/" if s.startswith(("q", "k", "v", "attn"))
                      else "MlpBlock_0/" if s in ("gelu", "fc2") else "") + s for s in per_block}
  assert set(sites) == want  # softmax float as asked
  kernel = sites["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel"]
  assert kernel.kind == qp.WEIGHT and kernel.scale.shape == (1, tiny_cfg.hidden_size)
  assert sites["Transformer/encoderblock_0/ln1"].scale.shape == ()


def test_quantization_error_shrinks_with_bits(setup):
  model, params, images = setup
  fp = model.apply({"params": params}, images)
  errors = [float(jnp.abs(run(model, params, calibrate(model, params, images,
                                                      quant_config(w_bits=b, a_bits=b)),
                              images) - fp).mean()) for b in (4, 6, 8)]
  assert errors[0] > errors[1] > errors[2] > 0


def test_changing_bit_widths_does_not_recompile(setup):
  model, params, images = setup
  traces = []

  @jax.jit
  def forward(qparams):
    traces.append(1)
    return run(model, params, qparams, images)

  base = calibrate(model, params, images, quant_config(w_bits=8, a_bits=8))
  outputs = []
  for bits in (8.0, 6.0, 4.0, 3.0):
    qparams = jax.tree_util.tree_map(lambda s: s.replace(bits=jnp.full_like(s.bits, bits)), base,
                                     is_leaf=qp.is_site)
    outputs.append(forward(qparams))
  assert len(traces) == 1
  assert not np.allclose(outputs[0], outputs[-1])


@pytest.mark.parametrize("softmax", ["float", "log_sqrt2"])
def test_vmap_over_64_candidates_equals_a_loop(setup, softmax):
  model, params, images = setup
  base = calibrate(model, params, images, quant_config(w_bits=4, a_bits=6, softmax=softmax))
  keys = jax.random.split(jax.random.PRNGKey(0), 64)

  def candidate(key):  # every scale jittered by up to +-20%
    leaves, tree = jax.tree_util.tree_flatten(base, is_leaf=qp.is_site)
    sub = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tree, [
        s.replace(scale=s.scale * jax.random.uniform(k, s.scale.shape, minval=0.8, maxval=1.2))
        for s, k in zip(leaves, sub)])

  population = jax.vmap(candidate)(keys)
  batched = jax.jit(jax.vmap(lambda q: run(model, params, q, images)))(population)
  single = jax.jit(lambda q: run(model, params, q, images))
  looped = np.stack([single(jax.tree_util.tree_map(lambda a: a[i], population))
                     for i in range(64)])
  # Batched and single matmuls may round differently in the last float bit, which can move a
  # value across a rounding boundary of a grid: allow a few such flips, not a wrong candidate.
  close = np.isclose(batched, looped, rtol=1e-5, atol=1e-5)
  assert close.mean() > 0.97 and close.all(axis=(1, 2)).mean() > 0.9
  assert float(jnp.std(batched[:, 0, 0])) > 0  # the candidates really differ


def test_options_log2_softmax_ptf_and_first_last_bits(setup, tiny_cfg):
  model, params, images = setup
  cfg = quant_config(sites="all", w_bits=4, a_bits=8, softmax="log2", softmax_bits=4, ptf=True,
                     first_layer_bits=8,
                     last_layer_bits=6, image_bits=0)
  sites = dict(qp.iter_sites(calibrate(model, params, images, cfg)))
  probs = sites["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/attn_probs"]
  assert probs.quantizer == qp.LOG2 and float(probs.bits) == 4
  ptf = sites["Transformer/encoderblock_0/residual1"]
  assert ptf.scale.shape[-1] == tiny_cfg.hidden_size
  ratios = np.log2(np.asarray(ptf.scale).ravel() / np.asarray(ptf.scale).min())
  np.testing.assert_allclose(ratios, np.round(ratios), atol=1e-4)  # power-of-two factors
  assert float(sites["embedding/kernel"].bits) == 8 and float(sites["head/kernel"].bits) == 6
  assert float(sites["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"].bits) == 4
  assert "image" not in sites


def test_bit_summary_plain_and_weighted(setup, tiny_cfg):
  model, params, images = setup
  qparams = calibrate(model, params, images, quant_config(w_bits=4, a_bits=8, first_layer_bits=8))
  summary = qp.bit_summary(qparams)
  n_kernels = 2 + 6 * tiny_cfg.num_layers
  assert summary["w_sites"] == n_kernels
  assert summary["w_bits"] == pytest.approx((8 + 4 * (n_kernels - 1)) / n_kernels)
  embed = params["embedding"]["kernel"].size
  total = sum(s.numel for _, s in qp.iter_sites(qparams, qp.WEIGHT))
  assert summary["w_bits_weighted"] == pytest.approx((8 * embed + 4 * (total - embed)) / total)
  assert summary["a_bits"] == summary["a_bits_weighted"] == 8


def test_straight_through_gradient_reaches_the_images(setup):
  model, params, images = setup
  qparams = calibrate(model, params, images, quant_config(w_bits=4, a_bits=4))
  grad = jax.grad(lambda x: run(model, params, qparams, x).sum())(images)
  assert np.isfinite(grad).all() and float(jnp.abs(grad).sum()) > 0


def test_integer_export_round_trips_to_the_fake_quantized_kernels(setup):
  model, params, images = setup
  qparams = calibrate(model, params, images, quant_config(w_bits=4, a_bits=8))
  arrays = export_integer(params, qparams)
  kernel_key = "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel"
  assert arrays[kernel_key + ".int"].dtype == np.int8
  assert -8 <= arrays[kernel_key + ".int"].min() and arrays[kernel_key + ".int"].max() <= 7
  # Dequantized export + activation sites only == fake quantization of everything.
  restored = dequantized_params(arrays)
  act_only = qp.unflatten(dict(qp.iter_sites(qparams, qp.ACTIVATION)))
  np.testing.assert_array_equal(run(model, restored, act_only, images),
                                run(model, params, qparams, images))


def test_orbax_save_and_restore(setup, tmp_path):
  model, params, images = setup
  qparams = calibrate(model, params, images, quant_config(w_bits=4, a_bits=8, softmax="log2"))
  qp.save(str(tmp_path / "qp"), qparams)
  restored = qp.restore(str(tmp_path / "qp"))
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(qparams)
  np.testing.assert_array_equal(run(model, params, restored, images),
                                run(model, params, qparams, images))


def test_observe_records_values_before_the_site_under_earlier_quantization(setup):
  model, params, images = setup
  qparams = calibrate(model, params, images, quant_config(w_bits=4, a_bits=4))
  fp = observe(model, {"params": params}, images)
  quant = observe(model, {"params": params, "quant": qparams}, images)
  np.testing.assert_array_equal(quant["image"], fp["image"])  # nothing quantized before it
  site = "Transformer/encoderblock_0/MlpBlock_0/gelu"
  assert not np.allclose(quant[site], fp[site], atol=1e-3)  # upstream quantization shows
  assert len(np.unique(np.asarray(quant[site]))) > 16  # recorded before its own 4-bit grid


def test_impossible_bits_are_named(setup):
  model, params, images = setup
  with pytest.raises(ValueError, match="config.quant.w_bits=0"):
    calibrate(model, params, images, quant_config(w_bits=0))
  with pytest.raises(ValueError, match="config.quant.a_observer"):
    calibrate(model, params, images, quant_config(a_observer="median"))
