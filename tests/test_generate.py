"""Stage 1 generator: losses on hand-built features, gradients through Q, short generations."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from clamp_jax import generate as gen
from clamp_jax.models import build_model
from clamp_jax.models.protocol import BlockGrid
from clamp_jax.models.quantized import calibrate, quant_config
from conftest import OPTIMIZED, random_images, tiny_model_config

CHECKPOINT = os.path.join(os.path.dirname(__file__), os.pardir, "checkpoints", "fmnist_vit.npz")

# Hand-written 3x3 neighbourhoods of a 3x3 grid (row-major patch indices).
NEIGHBOURS_3X3 = {0: [1, 3, 4], 1: [0, 2, 3, 4, 5], 2: [1, 4, 5], 3: [0, 1, 4, 6, 7],
                  4: [0, 1, 2, 3, 5, 6, 7, 8], 5: [1, 2, 4, 7, 8], 6: [3, 4, 7],
                  7: [3, 4, 5, 6, 8], 8: [4, 5, 7]}


# These tests check behaviour, not speed: they compile at XLA's level 0 like the whole suite
# (conftest); jitting a whole function also beats running it op by op. 200 generation steps on the
# reference model are the exception: their runtime matters.
optimising_jit = functools.partial(jax.jit, compiler_options=OPTIMIZED)
terms_of = jax.jit(gen.contrastive_terms, static_argnums=(2, 3, 4, 5))
contrast = jax.jit(gen.patch_contrastive_loss, static_argnums=(2, 3, 4, 5))
blocks_contrast = jax.jit(gen.blocks_contrastive_loss, static_argnums=(2,))
pse = jax.jit(gen.patch_similarity_entropy)
tv = jax.jit(gen.total_variation)


def info_nce(pos, all_, tau):
  """-log(sum_pos exp(s / tau) / sum_all exp(s / tau)), in float64."""
  pos, all_ = np.asarray(pos, np.float64), np.asarray(all_, np.float64)
  return -np.log(np.exp(pos / tau).sum() / np.exp(all_ / tau).sum())


# --- neighbourhoods and the patch-contrastive loss -------------------------------------------

def test_neighbourhood_has_3_5_8_neighbours_at_corner_edge_interior():
  index, valid = gen.neighbourhood((4, 4), 3)
  counts = valid.sum(axis=1).reshape(4, 4)
  np.testing.assert_array_equal(counts, [[3, 5, 5, 3], [5, 8, 8, 5], [5, 8, 8, 5], [3, 5, 5, 3]])
  assert sorted(index[0][valid[0]]) == [1, 4, 5]            # corner (0, 0)
  assert sorted(index[1][valid[1]]) == [0, 2, 4, 5, 6]      # top edge (0, 1)
  assert sorted(index[5][valid[5]]) == [0, 1, 2, 4, 6, 8, 9, 10]  # interior (1, 1)
  assert (index >= 0).all() and (index < 16).all()         # invalid entries stay gatherable
  index, valid = gen.neighbourhood((3, 3), 3)
  for n, want in NEIGHBOURS_3X3.items():
    assert sorted(index[n][valid[n]]) == want
  _, valid = gen.neighbourhood((5, 5), 5)
  assert valid.shape == (25, 24) and valid[12].all() and valid[0].sum() == 8


def test_identical_candidates_give_minus_log_positives_over_valid():
  """All similarities equal => each anchor's loss is -log(n_pos / n_valid), with
  n_pos = min(p, n_valid - 1): corner -log(2/3), edge -log(4/5), interior -log(4/8).

  This is the loss's largest value (the top-p of any similarities carry at least p / n_valid of
  the mass), so any other candidates score at most this, anchor by anchor.
  """
  rng = np.random.default_rng(0)
  b, grid, d, p = 2, (4, 4), 8, 4
  anchors = jnp.asarray(rng.normal(size=(b, 16, d)), jnp.float32)
  same = jnp.broadcast_to(jnp.asarray(rng.normal(size=(1, 1, d)), jnp.float32), (b, 16, d))
  _, valid = gen.neighbourhood(grid, 3)
  n_valid = valid.sum(axis=1)
  per_anchor = -np.log(np.minimum(p, n_valid - 1) / n_valid)
  terms, counted = terms_of(anchors, same, grid, 3, p, 0.1)
  assert counted.all()
  np.testing.assert_allclose(terms, np.broadcast_to(per_anchor, (b, 16)), rtol=1e-5)
  want = (4 * np.log(3 / 2) + 8 * np.log(5 / 4) + 4 * np.log(2)) / 16
  np.testing.assert_allclose(contrast(anchors, same, grid, 3, p, 0.1), want, rtol=1e-5)
  spread = jnp.asarray(rng.normal(size=(b, 16, d)), jnp.float32)
  terms, _ = terms_of(anchors, spread, grid, 3, p, 0.1)
  assert (np.asarray(terms) <= per_anchor + 1e-5).all() and (np.asarray(terms) > 0).all()


def test_positives_are_the_top_p_most_similar_neighbours():
  """Every anchor is e1; candidate j is (cos t_j, sin t_j), so sim(anchor, j) = s[j] exactly."""
  s = np.array([0.9, -0.5, 0.8, 0.1, 0.0, 0.7, -0.9, 0.6, 0.3])
  theta = np.arccos(s)
  candidates = jnp.asarray(np.stack([np.cos(theta), np.sin(theta)], -1)[None], jnp.float32)
  anchors = jnp.asarray(np.tile([[3.0, 0.0]], (1, 9, 1)), jnp.float32)  # norm does not matter
  tau = 0.5
  terms, counted = terms_of(anchors, candidates, (3, 3), 3, 4, tau)
  assert counted.all()
  # centre: 8 neighbours, positives {0.9, 0.8, 0.7, 0.6} (patches 0, 2, 5, 7)
  centre = info_nce([0.9, 0.8, 0.7, 0.6], s[NEIGHBOURS_3X3[4]], tau)
  # corner 0: neighbours 1, 3, 4 -> 2 positives {0.1, 0.0}, one negative -0.5
  corner = info_nce([0.1, 0.0], [-0.5, 0.1, 0.0], tau)
  # edge 1: neighbours 0, 2, 3, 4, 5 -> 4 positives {0.9, 0.8, 0.7, 0.1}, negative 0.0
  edge = info_nce([0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.1, 0.0, 0.7], tau)
  np.testing.assert_allclose(np.asarray(terms)[0, [4, 0, 1]], [centre, corner, edge], rtol=1e-5)
  hand = []
  for n, nb in NEIGHBOURS_3X3.items():
    sims = np.sort(s[nb])[::-1]
    hand.append(info_nce(sims[:min(4, len(nb) - 1)], sims, tau))
  np.testing.assert_allclose(contrast(anchors, candidates, (3, 3), 3, 4, tau),
                             np.mean(hand), rtol=1e-5)


def test_contrastive_loss_is_invariant_to_the_order_of_images():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(5, 12, 6)), jnp.float32)
  c = jnp.asarray(rng.normal(size=(5, 12, 6)), jnp.float32)
  perm = np.array([3, 0, 4, 1, 2])
  loss = contrast(a, c, (3, 4), 3, 4, 0.1)
  np.testing.assert_allclose(contrast(a[perm], c[perm], (3, 4), 3, 4, 0.1), loss, rtol=1e-6)
  stack = blocks_contrast(jnp.stack([a, c]), jnp.stack([c, a]), (BlockGrid((3, 4)),) * 2)
  want = (loss + contrast(c, a, (3, 4), 3, 4, 0.1)) / 2
  np.testing.assert_allclose(stack, want, rtol=1e-6)
  cls = jnp.ones((5, 1, 6))  # token 0 is CLS (a prefix of 1): dropped
  a_cls, c_cls = jnp.concatenate([cls, a], axis=1), jnp.concatenate([cls, c], axis=1)
  np.testing.assert_allclose(blocks_contrast(a_cls[None], c_cls[None], (BlockGrid((3, 4), 1),)),
                             loss, rtol=1e-6)


def test_contrastive_loss_rejects_bad_shapes_and_arguments():
  x = jnp.zeros((1, 9, 4))
  with pytest.raises(ValueError, match="drop the CLS token"):
    gen.patch_contrastive_loss(jnp.zeros((1, 10, 4)), jnp.zeros((1, 10, 4)), (3, 3))
  with pytest.raises(ValueError, match="odd"):
    gen.patch_contrastive_loss(x, x, (3, 3), k=4)
  with pytest.raises(ValueError, match="two neighbours"):
    gen.patch_contrastive_loss(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)), (1, 2))


# --- PSE, TV, CE -----------------------------------------------------------------------------

def test_patch_similarity_entropy_on_hand_built_similarities():
  """Identical tokens: the range [min, max] is empty, entropy 0. Two antipodal groups: every
  similarity is +1 or -1 (half each), so the KDE is p = 0.5 / (0.01 * sqrt(2 pi)) at both ends of
  the 10 points and 0 between: entropy = trapezoid = -(2 / 9) * p * log(p). Random directions in
  3-D: the cosine is uniform on [-1, 1], entropy about log 2, far above the two-group case."""
  e1 = np.eye(3)[0]
  same = jnp.asarray(np.tile(e1, (2, 16, 1)), jnp.float32)
  assert pse(same) == 0
  two = jnp.asarray(np.tile(np.concatenate([np.tile(e1, (8, 1)), np.tile(-e1, (8, 1))]),
                            (2, 1, 1)), jnp.float32)
  p = 0.5 / (0.01 * np.sqrt(2 * np.pi))
  np.testing.assert_allclose(pse(two), -(2 / 9) * p * np.log(p), rtol=1e-4)
  spread = jnp.asarray(np.random.default_rng(2).normal(size=(2, 128, 3)), jnp.float32)
  h_spread = pse(spread)
  assert abs(h_spread - np.log(2)) < 0.2 and h_spread > pse(two)
  grad = jax.jit(jax.grad(gen.patch_similarity_entropy))(spread)
  assert np.isfinite(grad).all() and np.abs(grad).sum() > 0


def test_total_variation_and_cross_entropy():
  assert tv(jnp.full((1, 8, 8, 1), 0.7)) == 0
  stripes = jnp.tile(jnp.array([0.0, 1.0]), 4)[None, None, :, None] * jnp.ones((1, 8, 1, 1))
  np.testing.assert_allclose(tv(stripes), 1.0)  # |dx| = 1 everywhere, dy = 0
  logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
  np.testing.assert_allclose(jax.jit(gen.target_cross_entropy)(logits, jnp.array([0, 2])),
                             -(np.log(0.5) + np.log(0.8)) / 2, rtol=1e-6)


def test_logits_kl_against_its_formula():
  p = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
  q = jnp.log(jnp.array([[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]))
  kl_first = 0.5 * np.log(2) + 0.25 * np.log(0.5)  # the second image: P = Q, KL 0
  np.testing.assert_allclose(jax.jit(gen.logits_kl)(p + 3.0, q), kl_first / 2, rtol=1e-6)
  assert float(gen.logits_kl(p, p)) == pytest.approx(0.0, abs=1e-7)


# --- config, augmentation, PNG ---------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(steps=0), "steps"), (dict(num_images=0), "num_images"),
    (dict(neighbourhood=4), "neighbourhood"), (dict(neighbourhood=1), "neighbourhood"),
    (dict(positives=0), "positives"), (dict(positives=8), "positives"),
    (dict(tau=0.0), "tau"), (dict(lr=-1.0), "lr"), (dict(b2=1.0), "b2"),
    (dict(method="gan"), "method"), (dict(generator="vae"), "generator"),
    (dict(w_tv=-0.1), "w_tv"), (dict(w_disagree=-1.0), "w_disagree"),
    (dict(w_contrast=0.0, w_ce=0.0, w_tv=0.0), "w_contrast"),
])
def test_validate_names_the_field(overrides, field):
  gen.validate(gen.generate_config())
  with pytest.raises(ValueError, match=f"config.generate.{field}="):
    gen.validate(gen.generate_config(**overrides))


def test_generate_config_rejects_unknown_fields():
  with pytest.raises(ValueError, match="unknown config.generate fields"):
    gen.generate_config(step=3)


def test_augment_rolls_and_flips_without_changing_values():
  assert gen.roll_pixels(224, 1 / 15) == 15 and gen.roll_pixels(28, 1 / 15) == 2
  assert gen.roll_pixels(8, 1 / 15) == 1 and gen.roll_pixels(8, 0.0) == 0
  images = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.float32).reshape(2, 6, 6, 1)
  out = jax.jit(gen.augment, static_argnums=(2, 3))(jax.random.PRNGKey(0), images, 2, True)
  assert out.shape == images.shape
  for x, y in zip(np.asarray(images), np.asarray(out)):
    np.testing.assert_array_equal(np.sort(x.ravel()), np.sort(y.ravel()))


def test_save_png_grid_writes_denormalised_images(tmp_path):
  mean, std = 0.5, 0.25
  images = (np.stack([np.zeros((4, 4, 1)), np.ones((4, 4, 1))]) - mean) / std  # black, white
  path = str(tmp_path / "grid.png")
  gen.save_png_grid(path, images, mean, std)
  sheet = np.asarray(Image.open(path))
  assert sheet.shape == (2 + 6, 2 + 2 * 6)  # 1 row x 2 columns, 2-pixel gaps
  assert sheet[2:6, 2:6].max() == 0 and sheet[2:6, 8:12].min() == 255
  assert os.listdir(tmp_path) == ["grid.png"]


# --- through the models ----------------------------------------------------------------------

def small_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = tiny_model_config(image_size=16, patch_size=4, hidden_size=16, num_layers=1,
                                   num_heads=2, mlp_dim=16, num_classes=4)
  config.data = ml_collections.ConfigDict(dict(mean=0.5, std=0.25))
  config.quant = quant_config(w_bits=4, a_bits=4)
  config.generate = gen.generate_config(**{**dict(num_images=4, steps=30, warmup_steps=5),
                                           **overrides})
  return config


def numpy_random_params(model, model_cfg, seed: int = 0):
  """Like conftest's `random_params` (every leaf N(0, 0.3^2)), drawn with numpy: no compile."""
  shape = (1, model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros(shape))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32), abstract)


@pytest.fixture(scope="module")
def tiny():
  """A 1-block random ViT on 16x16x3 (a 4x4 patch grid) and its w4a4 min-max QuantParams."""
  config = small_config()
  model = build_model(config.model)
  params = numpy_random_params(model, config.model)
  calibrate_w4a4 = jax.jit(lambda p, x: calibrate(model, p, x, config.quant))
  qparams = calibrate_w4a4(params, jnp.asarray(random_images(config.model, n=4)))
  return model, params, qparams, calibrate_w4a4


@pytest.fixture(scope="module")
def clamp_run(tiny):
  model, params, qparams, _ = tiny
  config = small_config()
  return config, gen.generate(config, model, params, qparams, jax.random.PRNGKey(0))


def test_gradients_reach_the_pixels_through_the_quantized_model(tiny):
  model, params, qparams, _ = tiny
  config = small_config()
  images = jnp.asarray(random_images(config.model, n=4, seed=5))

  @jax.jit
  def grad_through_q(x):
    def loss(x):
      _, q = model.apply({"params": params, "quant": qparams}, x, return_intermediates=True)
      _, p = model.apply({"params": params}, x, return_intermediates=True)
      return gen.blocks_contrastive_loss(q["attn"], jax.lax.stop_gradient(p["attn"]),
                                         model.block_grids(16))  # only Q's path has a gradient
    return jax.grad(loss)(x)

  grads = np.asarray(grad_through_q(images))
  assert np.isfinite(grads).all()
  assert (np.abs(grads).reshape(4, -1).sum(axis=1) > 0).all()  # every image gets a gradient


def check_report(config, images, targets, report, steps):
  lo, hi = gen.valid_range(config)
  assert images.shape == (4, 16, 16, 3) and targets.shape == (4,)
  assert np.isfinite(images).all()
  assert (np.asarray(images) >= lo - 1e-6).all() and (np.asarray(images) <= hi + 1e-6).all()
  assert len(report["loss_curve"]) == steps and np.isfinite(report["loss_curve"]).all()
  assert report["misprediction_rate"] + report["target_accuracy"] == pytest.approx(100.0)
  assert report["steps_per_second"] > 0 and np.isfinite(report["final_loss"])
  first, last = np.mean(report["loss_curve"][:5]), np.mean(report["loss_curve"][-5:])
  assert last < first, (first, last)


def test_clamp_pixels_generation_lowers_the_loss(clamp_run):
  config, (images, targets, state, report) = clamp_run
  check_report(config, images, targets, report, steps=30)
  assert set(report["final_terms"]) == {"contrast", "ce", "tv"}


@pytest.mark.parametrize("method, generator", [("clamp", "conv"), ("psaq", "pixels"),
                                               ("psaq", "conv")])
def test_generation_lowers_the_loss(tiny, method, generator):
  model, params, qparams, _ = tiny
  config = small_config(method=method, generator=generator)
  q = qparams if method == "clamp" else {}  # PSAQ-ViT never looks at Q
  images, targets, _, report = gen.generate(config, model, params, q, jax.random.PRNGKey(1))
  check_report(config, images, targets, report, steps=30)


def test_the_disagreement_term_makes_images_where_q_departs_from_p(tiny, clamp_run):
  model, params, qparams, _ = tiny
  _, (plain, _, _, _) = clamp_run
  config = small_config(w_disagree=100.0)  # KL is ~1e-3 on this W4/A4 toy
  images, _, _, report = gen.generate(config, model, params, qparams, jax.random.PRNGKey(0))
  assert set(report["final_terms"]) == {"contrast", "disagree", "ce", "tv"}
  kl = lambda x: float(gen.logits_kl(model.apply({"params": params}, x),
                                     model.apply({"params": params, "quant": qparams}, x)))
  assert report["final_terms"]["disagree"] == pytest.approx(kl(images), rel=1e-4)
  assert kl(images) > 1.5 * kl(plain)  # the same seed without the term


def test_warm_start_continues_from_the_given_state(tiny, clamp_run):
  model, params, qparams, calibrate_w4a4 = tiny
  config, (images, targets, state, _) = clamp_run
  same, same_targets, _, report = gen.generate(config, model, params, qparams, init_state=state,
                                               steps=0)
  np.testing.assert_array_equal(same, images)  # 0 refresh steps: the images it was given
  np.testing.assert_array_equal(same_targets, targets)
  assert report["loss_curve"] == [] and np.isfinite(report["final_loss"])
  new_q = calibrate_w4a4(params, images)  # Q moved on: refresh against it
  refreshed, _, new_state, report = gen.generate(config, model, params, new_q, init_state=state,
                                                 steps=3)
  assert len(report["loss_curve"]) == 3
  assert not np.array_equal(refreshed, images)
  np.testing.assert_array_equal(new_state.targets, targets)
  assert not any(a.is_deleted() for a in jax.tree_util.tree_leaves(state))  # copied, not donated


def test_the_step_writes_each_update_over_the_last(tiny, clamp_run):
  from clamp_jax.generate.loop import _compiled
  model, params, qparams, _ = tiny
  config, (_, targets, state, _) = clamp_run
  frozen = ml_collections.FrozenConfigDict(
      {"generate": config.generate, "model": config.model, "data": config.data})
  _, tx, step = _compiled(model, frozen)
  gen_params = jax.tree_util.tree_map(jnp.copy, state.gen_params)
  opt_state = tx.init(gen_params)
  out = step(gen_params, opt_state, targets, params, qparams, jax.random.PRNGKey(0), 0,
             np.float32(0.1), True)
  donated = jax.tree_util.tree_leaves((gen_params, opt_state))
  assert donated and all(a.is_deleted() for a in donated)
  assert all(np.isfinite(a).all() for a in jax.tree_util.tree_leaves(out[:2]))


@pytest.mark.skipif(not os.path.exists(CHECKPOINT),
                    reason="checkpoints/fmnist_vit.npz not trained yet")
def test_clamp_generation_on_the_fashion_mnist_reference_model(monkeypatch):
  from configs import fmnist_vit
  from clamp_jax.models.checkpoints import load_checkpoint

  monkeypatch.setattr(jax, "jit", optimising_jit)  # 200 steps of a 6-block model: runtime matters

  config = fmnist_vit.get_config("w4a8")
  config.generate = gen.generate_config(num_images=32, steps=200, warmup_steps=20)
  model_cfg, params = load_checkpoint(CHECKPOINT, config.model)
  model = build_model(model_cfg)
  images, targets, _, report = gen.generate(config, model, params, None, jax.random.PRNGKey(0))
  curve = report["loss_curve"]
  assert np.mean(curve[-5:]) < np.mean(curve[:5])
  logits = model.apply({"params": params}, images)
  accuracy = 100.0 * float(jnp.mean(jnp.argmax(logits, -1) == targets))
  assert abs(accuracy - report["target_accuracy"]) <= 100 / 32  # same images, same model
  assert accuracy > 50.0  # chance is 10%
