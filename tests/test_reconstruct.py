"""AdaRound's quantizer and the block-wise rounding reconstruction (`config.reconstruct`)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models.quantized import quant_config
from clamp_jax.quant import adaround
from clamp_jax.quant.uniform import fake_quant
from clamp_jax.search import reconstruct, reconstruct_config
from clamp_jax.quant.params import ACTIVATION, WEIGHT, flatten
from clamp_jax.search.reconstruct import (EMBEDDING_KERNEL, block_weight_sites, kernel_drift,
                                         validate)
from conftest import calibrated_tiny


def grid(seed=0, bits=3, shape=(16, 8)):
  """`(w, scale, zero_point, bits)`: random weights and their per-column min-max grid."""
  w = jax.random.normal(jax.random.PRNGKey(seed), shape)
  lo, hi = w.min(0, keepdims=True), w.max(0, keepdims=True)
  scale = (hi - lo) / (2 ** bits - 1)
  return w, scale, jnp.round(-lo / scale), bits


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_rounding_starts_at_the_weight_and_hard_rounding_is_floor_or_ceil(seed):
  w, scale, zp, bits = grid(seed)
  v = adaround.init_logits(w, scale)
  soft = adaround.adaround_fake_quant(w, v, scale, zp, bits)
  inside = (w / scale + zp >= 0) & (w / scale + zp <= 2 ** bits - 1)  # not clipped by the grid
  assert float(inside.mean()) > 0.8
  np.testing.assert_allclose(jnp.where(inside, soft, w), w,
                             atol=2e-3 * float(scale.max()))  # the clip of init_logits
  hard = adaround.adaround_fake_quant(w, v, scale, zp, bits, hard=True)
  down = (jnp.floor(w / scale + 1e-6)) * scale
  steps = np.asarray((hard - down) / scale)
  assert np.all((np.abs(steps) < 1e-4) | (np.abs(steps - 1) < 1e-4))  # one of the two neighbours
  np.testing.assert_allclose(fake_quant(hard, scale, zp, bits), hard, atol=1e-6)  # on the grid
  assert float(jnp.max(jnp.abs(hard - w) / scale)) <= 1.0 + 1e-5


def test_penalty_vanishes_at_hard_choices_and_gradient_reaches_the_logits():
  assert float(adaround.rounding_penalty(jnp.array([-30.0, 30.0]), 2.0)) < 1e-6
  assert float(adaround.rounding_penalty(jnp.array([0.0]), 2.0)) > 0.9
  w, scale, zp, bits = grid()
  v = adaround.init_logits(w, scale)
  g = jax.grad(lambda v: jnp.sum(adaround.adaround_fake_quant(w, v, scale, zp, bits) ** 2))(v)
  assert float(jnp.abs(g).sum()) > 0


@pytest.fixture(scope="module")
def tiny():
  return calibrated_tiny(quant_config(w_bits=3, a_bits=4))[1:]


def flatten_params(params) -> dict:
  """`{"a/b/kernel": array}` of a params tree."""
  return flax.traverse_util.flatten_dict(params, sep="/")


def block_error(model, params, qparams, images, block):
  """Mean squared error of block `block`'s output, quantized model against float."""
  _, fp = model.apply({"params": params}, images, return_intermediates=True)
  _, q = model.apply({"params": params, "quant": qparams}, images, return_intermediates=True)
  return float(jnp.mean(jnp.square(q["block"][block] - fp["block"][block])))


def logits_error(model, fp_params, params, qparams, images):
  """Mean squared error of the logits, `params` under `qparams` against the float `fp_params`."""
  fp = model.apply({"params": fp_params}, images)
  return float(jnp.mean(jnp.square(model.apply({"params": params, "quant": qparams}, images)
                                   - fp)))


def test_reconstruction_moves_kernels_to_a_neighbouring_grid_point_and_lowers_the_error(tiny):
  model, params, images, qparams = tiny
  cfg = reconstruct_config(steps=150, loss="mse", quantized_input=1.0, lr=5e-2)
  rounded, _, history = reconstruct(model, params, qparams, images, cfg)
  assert [h["block"] for h in history] == ["embedding", 0, 1]
  sites = {**block_weight_sites(qparams, 0), **block_weight_sites(qparams, 1),
           EMBEDDING_KERNEL: flatten(qparams)[EMBEDDING_KERNEL]}
  assert len(sites) == 13  # the embedding; query, key, value, out, Dense_0, Dense_1 per block
  flat = lambda p: {k: v for k, v in jax.tree_util.tree_flatten_with_path(p)[0]}
  before = {jax.tree_util.keystr(k): v for k, v in flat(params).items()}
  after = {jax.tree_util.keystr(k): v for k, v in flat(rounded).items()}
  changed = [k for k in before if not np.array_equal(before[k], after[k])]
  assert len(changed) == 13 and all(k.endswith("['kernel']") for k in changed)
  for path, site in sites.items():
    kernel = rounded
    for part in path.split("/"):
      kernel = kernel[part]
    view = kernel.reshape(-1, site.scale.shape[-1])
    np.testing.assert_allclose(site(view), view, atol=1e-5, err_msg=path)  # on the grid
    original = before["".join(f"['{p}']" for p in path.split("/"))].reshape(view.shape)
    assert float(jnp.max(jnp.abs(view - original) / site.scale)) <= 1.0 + 1e-4, path
  # The learned rounding reconstructs each unit better than rounding to nearest.
  assert all(h["after"] < h["before"] for h in history)
  assert block_error(model, rounded, qparams, images, 1) < block_error(
      model, params, qparams, images, 1)


def test_learned_activation_steps_change_only_the_blocks_activation_steps_and_lower_the_error(
    tiny):
  model, params, images, qparams = tiny
  cfg = reconstruct_config(steps=60, lr=5e-2)
  rounded, same, history = reconstruct(model, params, qparams, images, cfg)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, same, qparams))  # off
  learned_params, learned, learned_history = reconstruct(
      model, params, qparams, images, reconstruct_config(**dict(cfg, act_scale_lr=5e-2)))
  old, new = flatten(qparams), flatten(learned)
  assert old.keys() == new.keys()
  moved = [path for path in old if not np.array_equal(old[path].scale, new[path].scale)]
  expected = [path for path, site in old.items() if path.startswith("Transformer/encoderblock_")
              and site.kind == ACTIVATION and site.has_scale]
  assert moved and set(moved) <= set(expected)
  assert len(moved) >= len(expected) - 2  # a site without gradient (clipped nowhere) may stay
  for path in old:
    np.testing.assert_array_equal(old[path].zero_point, new[path].zero_point)
    np.testing.assert_array_equal(old[path].bits, new[path].bits)
    assert (old[path].quantizer, old[path].kind) == (new[path].quantizer, new[path].kind)
  # Block 0 starts from the same error either way; the steps let each block reconstruct better.
  assert learned_history[1]["block"] == 0
  assert learned_history[1]["before"] == pytest.approx(history[1]["before"], rel=1e-4)
  for a, b in zip(history[1:], learned_history[1:]):
    assert b["after"] < a["after"]
  assert block_error(model, learned_params, learned, images, 1) < block_error(
      model, rounded, qparams, images, 1)


def test_learned_kernel_steps_keep_each_kernel_on_its_new_grid_and_lower_the_error(tiny):
  model, params, images, qparams = tiny
  cfg = reconstruct_config(steps=60, lr=5e-2, head=True)
  _, _, history = reconstruct(model, params, qparams, images, cfg)
  learned_params, learned, learned_history = reconstruct(
      model, params, qparams, images, reconstruct_config(**dict(cfg, w_scale_lr=1e-2)))
  old, new = flatten(qparams), flatten(learned)
  moved = {path for path in old if not np.array_equal(old[path].scale, new[path].scale)}
  kernels = {path for path, site in old.items() if site.kind == WEIGHT}
  assert len(kernels) == 14 and moved == kernels  # the embedding, 6 per block, the head
  flat = flatten_params(learned_params)
  for path in kernels:
    view = flat[path].reshape(-1, new[path].scale.shape[-1])
    np.testing.assert_allclose(new[path](view), view, atol=1e-5, err_msg=path)  # on the new grid
    np.testing.assert_array_equal(old[path].zero_point, new[path].zero_point)
  assert learned_history[0]["before"] == pytest.approx(history[0]["before"], rel=1e-4)
  assert all(h["after"] < h["before"] for h in learned_history)
  assert logits_error(model, params, learned_params, learned, images) < logits_error(
      model, params, params, qparams, images)


def test_kernel_drift_is_one_at_nearest_rounding_and_zero_at_the_float_kernels():
  w, scale, zp, bits = grid()
  nearest = fake_quant(w, scale, zp, bits)
  error = {"k": jnp.sum(jnp.square(nearest - w))}
  assert float(kernel_drift({"k": nearest}, {"k": w}, error)) == pytest.approx(1.0)
  assert float(kernel_drift({"k": w}, {"k": w}, error)) == 0.0


def test_the_kernel_drift_term_holds_the_rounding_nearer_nearest_rounding(tiny):
  model, params, images, qparams = tiny
  cfg = reconstruct_config(steps=150, lr=5e-2, embedding=False)
  _, _, free = reconstruct(model, params, qparams, images, cfg)
  _, _, held = reconstruct(model, params, qparams, images,
                           reconstruct_config(**dict(cfg, w_error=1.0)))
  assert [h["block"] for h in held] == [0, 1]
  # Block 0 starts from the same nearest rounding either way; AdaRound alone moves its kernels
  # further from the float ones than nearest rounding, the drift term holds them nearer.
  assert held[0]["before"] == pytest.approx(free[0]["before"], rel=1e-5)
  assert free[0]["drift"] > held[0]["drift"] and free[1]["drift"] > held[1]["drift"]
  assert free[0]["drift"] > 1.0
  assert all(h["after"] < h["before"] for h in held)  # and still reconstructs better than it


def test_embedding_and_blocks_can_be_left_out(tiny):
  model, params, images, qparams = tiny
  cfg = reconstruct_config(steps=2, blocks=False)
  rounded, _, history = reconstruct(model, params, qparams, images, cfg)
  assert [h["block"] for h in history] == ["embedding"]
  dense = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
  np.testing.assert_array_equal(flatten_params(rounded)[dense], flatten_params(params)[dense])
  _, _, history = reconstruct(model, params, qparams, images,
                              reconstruct_config(steps=2, embedding=False))
  assert [h["block"] for h in history] == [0, 1]


def test_the_head_is_rounded_last_on_its_grid_and_brings_the_logits_nearer_the_float_ones(tiny):
  model, params, images, qparams = tiny
  cfg = reconstruct_config(steps=150, lr=5e-2, embedding=False, blocks=False, head=True)
  rounded, _, history = reconstruct(model, params, qparams, images, cfg)
  assert [h["block"] for h in history] == ["head"]
  before, after = flatten_params(params), flatten_params(rounded)
  assert [k for k in before if not np.array_equal(before[k], after[k])] == ["head/kernel"]
  site = flatten(qparams)["head/kernel"]
  np.testing.assert_allclose(site(after["head/kernel"]), after["head/kernel"], atol=1e-5)
  moved = jnp.abs(after["head/kernel"] - before["head/kernel"]) / site.scale
  assert float(jnp.max(moved)) <= 1.0 + 1e-4
  assert history[0]["after"] < history[0]["before"]
  assert logits_error(model, params, rounded, qparams, images) < logits_error(
      model, params, params, qparams, images)
  _, _, history = reconstruct(model, params, qparams, images,
                              reconstruct_config(steps=2, head=True))
  assert [h["block"] for h in history] == ["embedding", 0, 1, "head"]


@pytest.mark.parametrize("field,value", [("steps", 0), ("loss", "l1"), ("quantized_input", 1.5),
                                         ("warmup", 1.0), ("lr", 0.0), ("penalty", -1.0),
                                         ("extra_images", -1), ("act_scale_lr", -1e-3),
                                         ("extra_anchor", "fp"), ("w_error", -1.0)])
def test_impossible_reconstruct_settings_are_named(field, value):
  with pytest.raises(ValueError, match=f"config.reconstruct.{field}"):
    validate(reconstruct_config(**{field: value}))


@pytest.mark.parametrize("arg,enabled", [("w3a4", True), ("w2a8", True), ("w4a4", True),
                                         ("mp,w4a4", True), ("w3a4,minmax", False),
                                         ("w4a3", False), ("w3a3", False), ("w6a6", False),
                                         ("", False)])
def test_the_cycle_reconstructs_by_default_at_low_bit_weights_and_4_bit_activations(arg, enabled):
  from configs import deit_s, fmnist_swin, fmnist_vit
  for module in (fmnist_vit, deit_s, fmnist_swin):
    config = module.get_config(arg)
    assert config.reconstruct.enabled == enabled
    assert config.reconstruct.head == (arg == "w2a8")  # the head too at 2-bit weights
    # the conv generator where the reconstruction runs, the pixels elsewhere
    assert config.generate.generator == ("conv" if enabled else "pixels")


def test_one_program_reconstructs_every_block_as_the_blocks_own_programs_do(tiny, request):
  model, params, images, qparams = tiny
  compiled = []  # the name of each XLA compilation

  def listen(event, _, fun_name="", **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(fun_name)

  jax.monitoring.register_event_duration_secs_listener(listen)
  request.addfinalizer(lambda: jax.monitoring.unregister_event_duration_listener(listen))
  cfg = reconstruct_config(steps=20, lr=5e-2, embedding=False, act_scale_lr=1e-2)
  shared, shared_q, shared_history = reconstruct(model, params, qparams, images, cfg)
  assert compiled.count("jit(_step)") == 1  # both blocks
  compiled.clear()
  own, own_q, own_history = reconstruct(model, params, qparams, images,
                                 reconstruct_config(**dict(cfg, share_programs=False)))
  assert compiled.count("jit(_step)") == 2  # one per block
  for block in range(2):
    for path in block_weight_sites(qparams, block):
      a, b = (flatten_params(p)[path] for p in (shared, own))
      step = flatten(qparams)[path].scale
      # the same rounding, up to an element whose logit sits at the threshold in float noise
      differ = np.abs(np.asarray(a) - np.asarray(b)).reshape(-1, step.shape[-1]) > 1e-3 * step
      assert differ.mean() < 1e-3, path
  for a, b in zip(shared_history, own_history):
    np.testing.assert_allclose([a["before"], a["after"]], [b["before"], b["after"]], rtol=1e-3)
  for path, site in flatten(shared_q).items():  # the same learned activation steps
    np.testing.assert_allclose(site.scale, flatten(own_q)[path].scale, rtol=1e-4, err_msg=path)


@pytest.mark.parametrize("source", ["clamp", "gaussian"])
def test_extra_images_join_the_searchs_and_are_drawn_apart_from_the_first_ones(source):
  from configs import fmnist_vit
  from clamp_jax.data.calibration import calibration_images
  from clamp_jax.generate import generate
  from clamp_jax.models import build_model
  from clamp_jax.models.quantized import calibrate
  from clamp_jax.pipeline import generation_config, reconstruction_images
  from conftest import random_params
  config = fmnist_vit.get_config("tiny,w4a4")
  config.calib.source = source
  model, params = build_model(config.model), random_params(config.model)
  if source == "gaussian":
    first = jnp.asarray(calibration_images(config))
  else:
    first = generate(generation_config(config), model, params, None)[0]
  searched = first + 0.01  # the search's final images: the first ones, refreshed
  qparams = calibrate(model, params, searched, config.quant)  # the search's QuantParams
  config.reconstruct.extra_images = 0
  assert reconstruction_images(config, model, params, searched, qparams) is searched
  config.reconstruct.extra_images = 3
  out = reconstruction_images(config, model, params, searched, qparams)
  assert out.shape == (searched.shape[0] + 3,) + searched.shape[1:]
  np.testing.assert_array_equal(out[:searched.shape[0]], searched)
  extra = np.asarray(out[searched.shape[0]:])
  assert np.all(np.isfinite(extra)) and extra.std() > 0.1
  distance = np.abs(extra[:, None] - np.asarray(first)[None]).mean(axis=(2, 3, 4))
  assert distance.min() > 0.05  # none a copy of a first image
  again = reconstruction_images(config, model, params, searched, qparams)
  np.testing.assert_array_equal(again, out)
  # anchored on the search's QuantParams, clamp's extra images are others (noise is noise)
  config.reconstruct.extra_anchor = "search"
  against_search = np.asarray(reconstruction_images(config, model, params, searched, qparams))
  np.testing.assert_array_equal(against_search[:searched.shape[0]], searched)
  assert np.allclose(against_search, out) == (source == "gaussian")
