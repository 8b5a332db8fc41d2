"""The CLAMP cycle on a foreign linen ViT: the generator and the data refresh through
`ForeignViT`, and mixed precision where the rules give bit ranges."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clamp_jax.generate import generate, generate_config
from clamp_jax.models.foreign import ForeignViT
from clamp_jax.models.intercept import Rule, apply_quantized_layers, calibrate_layers
from clamp_jax.models.protocol import BlockGrid
from clamp_jax.models.quantized import quant_config
from clamp_jax.quant.params import flatten
from clamp_jax.search import Budget, search_config, search_layers
from clamp_jax.search.budget import costs
from test_intercept_attention import WIDTH, TinyViT

SIZE, CLASSES = 16, 5  # a 4 x 4 grid of 4 x 4 patches
W4A4 = [Rule(".*", w_bits=4, a_bits=4)]
logits_fn = lambda out: out.logits


@pytest.fixture(scope="module")
def vit():
  """The model, every parameter drawn at random (shapes by `eval_shape`), and noise images."""
  model, rng = TinyViT(), np.random.default_rng(0)
  noise = jnp.asarray(rng.normal(size=(8, SIZE, SIZE, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), noise)
  variables = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(scale=0.5, size=a.shape), jnp.float32), shapes)
  return model, variables, noise


def gen_config(**overrides):
  return ml_collections.ConfigDict(dict(
      generate=generate_config(**dict(dict(num_images=8, steps=300, refresh_steps=4,
                                           warmup_steps=5), **overrides)),
      model=dict(image_size=SIZE, channels=3, num_classes=CLASSES),
      data=dict(mean=0.5, std=0.25)))


@pytest.fixture(scope="module")
def foreign(vit):
  model, variables, noise = vit
  adapter = ForeignViT(model, blocks=r"blocks_\d+/attn", output_fn=logits_fn)
  q0, _ = calibrate_layers(model, variables, W4A4, noise)  # Q before any image is generated
  return adapter, q0


@pytest.fixture(scope="module")
def generated(vit, foreign):
  """`(initial report, images, targets, state, report)` of one CLAMP generation."""
  _, variables, _ = vit
  adapter, q0 = foreign
  config = gen_config()
  *_, initial = generate(config, adapter, variables["params"], q0, steps=0)
  return (initial,) + generate(config, adapter, variables["params"], q0)


def test_blocks_by_regex_or_filter_give_the_attention_outputs_on_their_grid(vit, foreign):
  model, variables, noise = vit
  adapter, q0 = foreign
  by_filter = ForeignViT(model, lambda mdl, name: isinstance(mdl, nn.MultiHeadDotProductAttention),
                         output_fn=logits_fn)
  assert adapter.block_grids(SIZE) == by_filter.block_grids(SIZE) == [BlockGrid((4, 4), 0)] * 2
  with pytest.raises(ValueError, match="square grid"):  # 16 tokens less a class token
    ForeignViT(model, r"blocks_\d+/attn", logits_fn, prefix=1).block_grids(SIZE)
  for q in ({}, q0):  # P, then Q: the model under apply_quantized_layers
    logits, inter = adapter.apply({"params": variables["params"], "quant": q}, noise,
                                  return_intermediates=True)
    out, state = apply_quantized_layers(model, variables, q, noise, mutable="intermediates",
                                        capture_intermediates=True)
    np.testing.assert_array_equal(logits, out.logits)
    for b, tokens in enumerate(inter["attn"]):
      assert tokens.shape == (8, 16, WIDTH)
      np.testing.assert_array_equal(tokens,
                                    state["intermediates"][f"blocks_{b}"]["attn"]["__call__"][0])
    _, by_filter_inter = by_filter.apply({"params": variables["params"], "quant": q}, noise,
                                         return_intermediates=True)
    np.testing.assert_array_equal(by_filter_inter["attn"][1], inter["attn"][1])
  with pytest.raises(ValueError, match="picked no module"):
    ForeignViT(model, "nothing", logits_fn).block_grids(SIZE)


def test_generate_runs_on_the_foreign_vit(generated):
  initial, images, targets, _, report = generated
  assert images.shape == (8, SIZE, SIZE, 3) and np.isfinite(images).all()
  lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
  assert images.min() >= lo - 1e-6 and images.max() <= hi + 1e-6
  assert set(report["final_terms"]) == {"contrast", "ce", "tv"}
  assert report["final_loss"] < 0.5 * initial["final_loss"]
  curve = report["loss_curve"]
  assert np.mean(curve[-20:]) < np.mean(curve[:20])
  assert report["target_accuracy"] > 50  # the float model predicts most targets
  assert initial["target_accuracy"] < report["target_accuracy"]


def test_psaq_runs_on_the_same_tokens(vit, foreign):
  _, variables, _ = vit
  images, _, _, report = generate(gen_config(method="psaq", steps=3), foreign[0],
                                  variables["params"], None)
  assert np.isfinite(images).all() and np.isfinite(report["final_terms"]["pse"])


def test_cycle_with_refreshes_against_the_quantized_foreign_model(vit, foreign, generated):
  model, variables, _ = vit
  adapter, _ = foreign
  _, images, _, state, _ = generated
  qparams, _ = calibrate_layers(model, variables, W4A4, images)  # min-max on generated images
  config, refreshed = gen_config(), []

  def refresh(q, key):  # warm-started, against the current quantized model
    new, _, refreshed_state, _ = generate(config, adapter, variables["params"], q, key=key,
                                          init_state=(refreshed or [(None, state)])[-1][1])
    refreshed.append((new, refreshed_state))
    return new

  cfg = search_config(passes=2, generations=4, population=4, children=4, tournament=2,
                      refresh_every=2)
  searched, history = search_layers(model, variables, qparams, images, cfg,
                                    output_fn=logits_fn, refresh=refresh)
  assert len(refreshed) == 2  # generation 2 of each pass
  assert not np.array_equal(refreshed[-1][0], images)
  assert all(h["fitness_after"] <= h["fitness_before"] for h in history)
  assert any(not np.array_equal(flatten(searched)[p].scale, s.scale)
             for p, s in flatten(qparams).items())
  assert jax.tree_util.tree_structure(searched) == jax.tree_util.tree_structure(qparams)


def test_costs_of_a_foreign_model_count_its_kernels_and_macs(vit):
  model, variables, noise = vit
  qparams, _ = calibrate_layers(model, variables, [Rule(".*", w_bits=4, a_bits=8)], noise)
  tokens, patch_in = (SIZE // 4) ** 2, 4 * 4 * 3
  macs = {"patches": tokens * patch_in * WIDTH, "head": 1 * WIDTH * CLASSES}  # mean-pooled head
  for b in (0, 1):
    macs.update({f"blocks_{b}/attn/{n}": tokens * WIDTH * WIDTH
                 for n in ("query", "key", "value", "out")})
    macs.update({f"blocks_{b}/fc1": tokens * WIDTH * 2 * WIDTH,
                 f"blocks_{b}/fc2": tokens * 2 * WIDTH * WIDTH})
  assert set(macs) == {p for p, e in qparams.items() if "kernel" in e}
  kernels = {"/".join(k.key for k in keys[:-1]): a.size for keys, a in
             jax.tree_util.tree_leaves_with_path(variables["params"]) if keys[-1].key == "kernel"}
  assert {p: qparams[p]["kernel"].numel for p in macs} == kernels  # query: (D, heads, D / heads)
  np.testing.assert_array_equal(costs(qparams),
                                [4 * sum(kernels.values()), 4 * 8 * sum(macs.values())])


def test_mixed_precision_where_the_rules_give_ranges(vit):
  model, variables, noise = vit
  rules = [Rule(r"head", w_bits=8, a_bits=8),
           Rule(".*", w_bits=6, w_range=(2, 8), a_bits=8, a_range=(4, 8))]
  qparams, _ = calibrate_layers(model, variables, rules, noise)
  assert qparams["head"]["kernel"].bit_range == (8, 8)
  quant_cfg = quant_config(budget=1.0, budget_kind="both", bit_mutation_prob=0.5)
  budget = Budget.from_config(qparams, quant_cfg)
  assert not budget.allows(qparams)  # the 6-bit start is over the W4/A8 budget
  cfg = search_config(passes=2, generations=3, population=4, children=4, tournament=2)
  searched, history = search_layers(model, variables, qparams, noise, cfg, output_fn=logits_fn,
                                    quant_cfg=quant_cfg)
  assert budget.allows(searched) and "size_vs_w4a8" in history[-1]
  assert history[-1]["fitness_after"] <= history[-1]["fitness_before"]
  moved = set()
  for path, site in flatten(searched).items():
    start = flatten(qparams)[path]
    if path.startswith("head/") or not site.uniform:  # no range, or a log grid: bits kept
      assert float(site.bits) == float(start.bits), path
      continue
    low, high = (2, 8) if path.endswith("kernel") else (4, 8)
    assert low <= float(site.bits) <= high, path
    moved.add(float(site.bits))
  assert len(moved) > 1  # the start was lowered into the budget and bits were searched
  with pytest.raises(ValueError, match="w_range"):
    Rule(".*", w_bits=4, w_range=(5, 8))
