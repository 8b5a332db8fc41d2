"""Mixed precision: bit genes, the grid rescaled on a bit change, the W4/A8-relative budget."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models.quantized import calibrate, quant_config, validate
from clamp_jax.pipeline import quantize
from clamp_jax.quant.uniform import int_range
from clamp_jax.quant.params import WEIGHT, flatten
from clamp_jax.search import Budget, MixedEvolQ, search, search_config
from clamp_jax.search.budget import costs, report
from clamp_jax.search.mixed import with_bits
from conftest import calibrated_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(passes=1, generations=3, population=5, children=5, tournament=3, block_tokens=24)
TIGHT = dict(budget=0.85, budget_kind="both")


def mixed_config(**overrides):
  return quant_config(**dict(dict(w_bits=4, a_bits=8, mixed=True, softmax="log2"), **overrides))


@pytest.fixture(scope="module")
def setup():
  return calibrated_tiny(mixed_config())


@pytest.fixture(scope="module")
def searched(setup):
  _, model, params, images, qparams = setup
  return search(model, params, qparams, images, search_config(**SMALL),
                quant_cfg=mixed_config(**TIGHT))


def block_sites(qparams, block):
  return qparams["Transformer"][f"encoderblock_{block}"]


def test_mutated_bits_stay_in_the_candidate_set_and_move_by_at_most_one(setup):
  *_, qparams = setup
  center = block_sites(qparams, 1)
  strategy = MixedEvolQ(population_size=8, num_children=40, w_bits=(3, 5), a_bits=(4, 8),
                        bit_mutation_prob=0.5)
  parents = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (8,) + a.shape), center)
  children = strategy.ask(jax.random.PRNGKey(1), strategy.init(parents, jnp.arange(8.0)))
  moves = set()
  for path, site in flatten(center).items():
    mutated = flatten(children)[path]
    step = np.asarray(mutated.bits) - np.asarray(site.bits)
    if not site.uniform:
      assert not step.any(), path
      continue
    low, high = (3, 5) if site.kind == WEIGHT else (4, 8)
    assert np.all((low <= mutated.bits) & (mutated.bits <= high)), path
    assert set(step.tolist()) <= {-1.0, 0.0, 1.0}, path
    moves.update((site.kind, s) for s in step.tolist())
  assert {(WEIGHT, -1.0), (WEIGHT, 1.0), ("activation", -1.0)} <= moves  # A8 is the top


def covered(site, bits=None):
  """`(lo, hi)` of the values `site`'s grid (at `bits`, default its own) covers."""
  qmin, qmax = int_range(site.bits if bits is None else bits, site.signed)
  return (qmin - site.zero_point) * site.scale, (qmax - site.zero_point) * site.scale


def test_a_bit_change_keeps_the_range_the_grid_covers(setup):
  *_, qparams = setup
  checked = 0
  for path, site in flatten(block_sites(qparams, 0)).items():
    if not site.uniform:
      continue
    np.testing.assert_array_equal(with_bits(site, site.bits).scale, site.scale)
    _, qmax = int_range(site.bits, site.signed)
    for bits in (2.0, 3.0, 5.0, 8.0):
      if bits == float(site.bits):
        continue
      moved = with_bits(site, bits)
      _, new_qmax = int_range(bits, site.signed)
      # the same width of range (an activation's percentile clipping kept, not min-max's), its
      # low end moved by at most half a new step (the zero point is an integer)
      np.testing.assert_allclose(new_qmax * moved.scale, qmax * site.scale, rtol=1e-6,
                                 err_msg=path)
      assert np.all(np.abs(covered(moved)[0] - covered(site)[0]) <= 0.5 * moved.scale + 1e-6), path
      checked += 1
  assert checked > 20


def test_bits_moved_up_and_back_give_the_same_grid(setup):
  *_, qparams = setup
  for path, site in flatten(block_sites(qparams, 0)).items():
    if site.uniform:
      back = with_bits(with_bits(site, site.bits + 2), site.bits)
      np.testing.assert_allclose(back.scale, site.scale, rtol=1e-6, err_msg=path)
      np.testing.assert_array_equal(back.zero_point, site.zero_point, err_msg=path)


def test_symmetric_sites_keep_their_range_symmetric(setup):
  _, model, params, images, _ = setup
  qparams = calibrate(model, params, images, mixed_config(w_symmetric=True, a_symmetric=True))
  for path in ("MlpBlock_0/Dense_0/kernel", "ln1"):
    site = flatten(block_sites(qparams, 0))[path]
    moved = with_bits(site, 6.0)
    qmax = 2.0 ** (float(site.bits) - 1) - 1
    np.testing.assert_allclose(moved.scale, site.scale * qmax / (2 ** 5 - 1), rtol=1e-6)
    np.testing.assert_array_equal(moved.zero_point, np.zeros_like(site.zero_point))
    assert float(moved.bits) == 6.0


def test_costs_count_params_and_macs_and_uniform_w4a8_is_one(setup):
  cfg, model, params, images, qparams = setup
  assert report(qparams) == dict(size_vs_w4a8=1.0, bops_vs_w4a8=1.0)
  d, mlp, classes, p = cfg.hidden_size, cfg.mlp_dim, cfg.num_classes, cfg.patch_size
  patches = (cfg.image_size // p) ** 2
  block_params = 4 * d * d + 2 * d * mlp
  embed = p * p * cfg.channels * d
  size = embed + cfg.num_layers * block_params + d * classes
  bops = patches * embed + cfg.num_layers * (patches + 1) * block_params + d * classes
  np.testing.assert_array_equal(costs(qparams), [size * 4, bops * 4 * 8])
  w8a4 = calibrate(model, params, images, quant_config(w_bits=8, a_bits=4, image_bits=4))
  assert report(w8a4) == dict(size_vs_w4a8=2.0, bops_vs_w4a8=1.0)
  float_image = calibrate(model, params, images, quant_config(w_bits=4, a_bits=8, image_bits=0))
  assert costs(float_image)[1] == (bops - patches * embed) * 4 * 8  # a float input: no BOPs


def test_search_never_keeps_a_candidate_over_budget(setup, searched):
  *_, qparams = setup
  result, history = searched
  assert [h["block"] for h in history] == [1, 0]
  for h in history:  # the model after each block
    assert h["size_vs_w4a8"] <= 0.85 and h["bops_vs_w4a8"] <= 0.85
    assert h["fitness_after"] <= h["fitness_before"]
  assert Budget.of(qparams, 0.85, "both").allows(result)
  assert max(report(result).values()) <= 0.85
  bits = {p: float(s.bits) for p, s in flatten(result).items()}
  assert len({b for p, b in bits.items() if p.endswith("kernel") and "encoderblock" in p}) > 1
  assert bits["embedding/kernel"] == bits["head/kernel"] == 4.0  # not searched


def test_the_same_seed_gives_the_same_mixed_result(setup, searched):
  _, model, params, images, qparams = setup
  again, _ = search(model, params, qparams, images, search_config(**SMALL),
                    quant_cfg=mixed_config(**TIGHT))
  for path, site in flatten(searched[0]).items():
    for field in ("scale", "zero_point", "bits"):
      np.testing.assert_array_equal(getattr(site, field), getattr(flatten(again)[path], field),
                                    err_msg=f"{path}.{field}")


def test_a_budget_below_the_minimum_bits_is_named(setup):
  _, model, params, images, qparams = setup
  with pytest.raises(ValueError, match="config.quant.budget=0.2"):
    search(model, params, qparams, images, search_config(**SMALL),
           quant_cfg=mixed_config(budget=0.2))


@pytest.mark.parametrize("field,value", [
    ("w_bits_min", 1), ("w_bits_min", 9), ("a_bits_max", 17), ("bit_mutation_prob", 1.5),
    ("budget", 0.0), ("budget_kind", "flops"), ("a_bits", 2), ("ptf", True)])
def test_impossible_mixed_settings_are_named(field, value):
  with pytest.raises(ValueError, match=f"config.quant.{field}"):
    validate(mixed_config(**{field: value}))


def test_mp_preset_and_search_requirement():
  spec = importlib.util.spec_from_file_location("fmnist_vit",
                                                os.path.join(ROOT, "configs", "fmnist_vit.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny,mp")
  assert config.quant.mixed and config.search.enabled
  assert (config.quant.w_bits, config.quant.a_bits) == (4, 8)
  assert config.quant.mp_start == "lowered"
  with_preset = module.get_config("mp,w4a4").quant
  assert (with_preset.w_bits, with_preset.a_bits, with_preset.budget_kind) == (4, 4, "both")
  assert (with_preset.mp_start, with_preset.w_bits_min, with_preset.a_bits_min) == (
      "trades", 3, 4)
  assert module.get_config("mp,w6a6").quant.w_bits == 6
  assert not module.get_config("w4a4").quant.mixed
  config.search.enabled = False
  with pytest.raises(ValueError, match="config.search.enabled"):
    quantize(config, "unused")
