"""Mixed precision's sensitivity start: the per-site loss table, the greedy allocation under the
budget, and the sites the budget does not count (pinned at their bits)."""

import jax
import numpy as np
import pytest

from clamp_jax.models.quantized import apply_quantized
from clamp_jax.quant.params import WEIGHT, flatten, unflatten
from clamp_jax.search import Budget, MixedEvolQ, search, search_config
from clamp_jax.search.allocate import allocate, sensitivity_start, sensitivity_table, trade
from clamp_jax.search.budget import counted, report
from clamp_jax.search.evaluator import BlockEvaluator
from clamp_jax.search.fitness import Fitness, kl
from clamp_jax.search.mixed import BudgetError, pin_uncounted, with_bits
from conftest import calibrated_tiny
from test_mixed import SMALL, mixed_config

BLOCK0 = "Transformer/encoderblock_0/"
ATTENTION = BLOCK0 + "MultiHeadDotProductAttention_0/"
MLP = BLOCK0 + "MlpBlock_0/"


@pytest.fixture(scope="module")
def setup():
  return calibrated_tiny(mixed_config(w_bits=4, a_bits=4))


@pytest.fixture(scope="module")
def kl_only(setup):
  """The output-only KL evaluator the search's sensitivity start uses."""
  _, model, params, *_ = setup
  return BlockEvaluator(model, params, search_config(), fitness=Fitness(output_loss="kl",
                                                                        w_block=0.0))


def test_the_budget_counts_weights_and_the_inputs_of_weight_matmuls_only(setup):
  *_, qparams = setup
  paths = counted(qparams)
  assert {BLOCK0 + "ln1", BLOCK0 + "ln2", ATTENTION + "attn_v", MLP + "gelu",
          ATTENTION + "query/kernel", "head/kernel"} <= paths
  assert not {ATTENTION + "q", ATTENTION + "k", ATTENTION + "v"} & paths
  pinned = flatten(pin_uncounted(qparams))
  assert pinned[ATTENTION + "q"].bit_range == (4, 4)
  assert pinned[BLOCK0 + "ln1"].bit_range is None


@pytest.mark.parametrize("mp_start", ["sensitivity", "trades"])
def test_a_sensitivity_started_search_meets_the_budget_and_leaves_uncounted_sites(setup, mp_start):
  _, model, params, images, qparams = setup
  result, history = search(model, params, qparams, images, search_config(**SMALL),
                           quant_cfg=mixed_config(w_bits=4, a_bits=4, bit_mutation_prob=1.0,
                                                  budget_w_bits=4, budget_a_bits=4,
                                                  budget_kind="both", a_bits_min=3,
                                                  mp_start=mp_start))
  assert Budget.of(qparams, 1.0, "both", bits=(4, 4)).allows(result)
  uniform = report(qparams)  # the budget's: the same sites at W4/A4
  for h in history:
    assert h["bops_vs_w4a8"] <= uniform["bops_vs_w4a8"] + 1e-9
    assert h["size_vs_w4a8"] <= uniform["size_vs_w4a8"] + 1e-9
    assert h["fitness_after"] <= h["fitness_before"]
  sites = flatten(result)
  for block in (0, 1):
    for name in ("q", "k", "v"):
      site = sites[f"Transformer/encoderblock_{block}/MultiHeadDotProductAttention_0/{name}"]
      assert float(site.bits) == 4.0
  moved = [p for p in counted(result) if "encoderblock" in p and float(sites[p].bits) != 4.0]
  assert moved  # with every mutation moving bits, the counted sites did move


def test_the_table_holds_each_site_alone_at_each_of_its_bits(setup, kl_only):
  _, model, params, images, qparams = setup
  strategy = MixedEvolQ(w_bits=(3, 5), a_bits=(4, 6))
  qparams = pin_uncounted(qparams)
  table = sensitivity_table(kl_only, strategy, qparams, images, [0, 1],
                            jax.random.PRNGKey(0))
  assert set(table) == {p for p in counted(qparams) if "encoderblock" in p}
  fp_logits = model.apply({"params": params}, images)
  sites = flatten(qparams)
  for path in (MLP + "Dense_1/kernel", BLOCK0 + "ln2"):
    site = sites[path]
    low, high = strategy.bit_range(site)
    assert sorted(table[path]) == list(range(low, high + 1))
    for bits in (low, 4):
      changed = unflatten(dict(sites, **{path: with_bits(site, bits)}))
      expected = kl(apply_quantized(model, params, changed, images), fp_logits)
      np.testing.assert_allclose(table[path][bits], expected, rtol=1e-4, atol=1e-6)


def block_kernels(qparams) -> list:
  """The paths of the blocks' weight sites."""
  return [p for p, s in flatten(qparams).items() if s.kind == WEIGHT and "encoderblock" in p]


def at_bits(qparams, bits: dict) -> dict:
  """`qparams` with the sites of `bits` at those bits."""
  return unflatten({p: with_bits(s, bits[p]) if p in bits else s
                    for p, s in flatten(qparams).items()})


def test_allocation_buys_the_largest_loss_reduction_per_cost_within_the_budget(setup):
  *_, qparams = setup
  budget = Budget.of(qparams, 1.0, "both", bits=(4, 4))
  weights = block_kernels(qparams)
  sensitive, rest = weights[0], weights[1:]
  table = {p: {2: 1.0, 3: 0.5, 4: 0.4} for p in rest}
  table[sensitive] = {2: 9.0, 3: 5.0, 4: 2.0, 5: 1.0, 6: 0.0}
  bits = allocate(table, qparams, budget)
  assert bits[sensitive] == 6  # the one site whose bits buy the most
  assert max(bits[p] for p in rest) <= 4 and min(bits[p] for p in rest) >= 3
  assert budget.allows(at_bits(qparams, bits))
  # a site whose raise buys nothing keeps its lowest bits, whatever the budget left
  flat = {p: {2: 1.0, 3: 1.0, 4: 1.0} for p in weights}
  assert set(allocate(flat, qparams, budget).values()) == {2}


def test_trades_start_from_the_measured_bits_and_keep_only_moves_that_pay(setup):
  *_, qparams = setup  # every site at 4 bits: the budget of uniform W4/A4 is met exactly
  budget = Budget.of(qparams, 1.0, "both", bits=(4, 4))
  weights = block_kernels(qparams)
  sensitive, cheap, rest = weights[0], weights[1], weights[2:]
  table = {p: {3: 1.5, 4: 1.0, 5: 0.9} for p in rest}  # lowering costs more than raising buys
  table[sensitive] = {3: 3.0, 4: 1.0, 5: 0.2, 6: 0.1}
  table[cheap] = {3: 1.01, 4: 1.0, 5: 1.0}
  bits = trade(table, qparams, budget)
  assert bits[sensitive] == 5 and bits[cheap] == 3  # the one trade that pays, one bit each way
  assert all(bits[p] == 4 for p in rest)
  assert budget.allows(at_bits(qparams, bits))
  # where every move costs loss, the start's bits stay
  flat = {p: {3: 2.0, 4: 1.0, 5: 1.0} for p in weights}
  assert set(trade(flat, qparams, budget).values()) == {4}


def test_a_budget_below_the_lowest_bits_is_named(setup):
  *_, qparams = setup
  budget = Budget.of(qparams, 0.1, "size", bits=(4, 4))
  table = {p: {2: 1.0, 4: 0.0} for p in block_kernels(qparams)}
  with pytest.raises(BudgetError, match="config.quant.budget=0.1"):
    allocate(table, qparams, budget)


@pytest.mark.parametrize("allocation,limit", [(allocate, 1.0), (trade, 1.0), (trade, 0.8)])
def test_the_sensitivity_start_is_within_the_budget_and_deterministic(setup, kl_only, allocation,
                                                                      limit):
  _, model, params, images, qparams = setup
  strategy = MixedEvolQ(w_bits=(2, 8), a_bits=(4, 8))
  qparams = pin_uncounted(qparams)
  budget = Budget.of(qparams, limit, "both", bits=(4, 4))  # 0.8: the start is over it
  starts = [sensitivity_start(kl_only, strategy, qparams, images, [0, 1], budget,
                              jax.random.PRNGKey(0), allocation) for _ in range(2)]
  assert budget.allows(starts[0])
  assert any(float(a.bits) != float(b.bits) for a, b in zip(flatten(starts[0]).values(),
                                                            flatten(qparams).values()))
  for (path, a), b in zip(flatten(starts[0]).items(), flatten(starts[1]).values()):
    np.testing.assert_array_equal(a.bits, b.bits, err_msg=path)
    np.testing.assert_array_equal(a.scale, b.scale, err_msg=path)
