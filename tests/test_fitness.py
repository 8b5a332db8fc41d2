"""Fitness terms: the new block and output losses, the Fisher weights, the evaluator with them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models.quantized import quant_config
from clamp_jax.search import BlockEvaluator, EvolQ, search_config, with_block
from clamp_jax.search.evaluator import fisher_weights
from clamp_jax.search.fitness import BLOCK_LOSSES, Fitness, block_loss, output_loss
from clamp_jax.search.strategy import take
from conftest import calibrated_tiny

SMALL = dict(population=4, children=4, tournament=3, block_tokens=24)
NEW_BLOCK_LOSSES = ("mse", "cosine", "fisher")


@pytest.fixture(scope="module")
def setup():
  return calibrated_tiny(quant_config(w_bits=4, a_bits=4))[1:]


def tokens(seed, shape=(3, 5, 8)):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("kind", NEW_BLOCK_LOSSES)
def test_new_block_losses_are_zero_for_identical_tokens_and_positive_otherwise(kind):
  x, y = tokens(0), tokens(1)
  weights = jnp.abs(tokens(2))
  same = block_loss(x, x, kind, 3.0, jnp.arange(10), weights)
  other = block_loss(x, x + 0.3 * y, kind, 3.0, jnp.arange(10), weights)
  assert abs(float(same)) < 1e-6
  assert float(other) > 1e-3


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_output_losses_are_zero_for_identical_logits_and_positive_otherwise(kind):
  x, y = tokens(0, (4, 10)), tokens(1, (4, 10))
  assert abs(float(output_loss(x, x, kind, 3.0))) < 1e-6
  assert float(output_loss(x + 0.3 * y, x, kind, 3.0)) > 1e-3


def test_fisher_without_weights_and_unknown_kinds_are_named():
  x = tokens(0)
  with pytest.raises(ValueError, match="fisher"):
    block_loss(x, x, "fisher", 3.0, jnp.arange(4))
  with pytest.raises(ValueError, match="config.search.block_loss"):
    block_loss(x, x, "nope", 3.0, jnp.arange(4))


def head_from_stream(params, x):
  """The tiny model's head on the stream leaving the last block (encoder_norm, class token)."""
  x = nn.LayerNorm(epsilon=1e-6).apply({"params": params["Transformer"]["encoder_norm"]}, x)
  return x[:, 0] @ params["head"]["kernel"] + params["head"]["bias"]


def self_ce(logits_fn, stream, labels):
  logits = logits_fn(stream)
  return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))


def test_fisher_weights_equal_the_gradient_of_the_model_run_from_the_next_block(setup):
  model, params, images, _ = setup
  logits, inter = model.apply({"params": params}, images, return_intermediates=True)
  labels = jnp.argmax(logits, axis=-1)
  got = fisher_weights(model, params, images)
  assert got.shape == inter["block"].shape
  # block 0: the stream leaving it enters block 1
  from_block1 = lambda s: model.apply({"params": params}, s, start_block=1)
  g0 = jax.grad(lambda s: self_ce(from_block1, s, labels))(inter["block"][0])
  np.testing.assert_allclose(got[0], g0 ** 2, rtol=1e-4, atol=1e-10)
  # block 1 (the last): only the head follows; checked against it and a finite difference
  head = lambda s: head_from_stream(params, s)
  np.testing.assert_allclose(head(inter["block"][1]), logits, rtol=1e-5, atol=1e-5)
  g1 = jax.grad(lambda s: self_ce(head, s, labels))(inter["block"][1])
  np.testing.assert_allclose(got[1], g1 ** 2, rtol=1e-4, atol=1e-10)
  assert float(jnp.abs(g1).max()) > 0
  i = np.unravel_index(int(jnp.argmax(jnp.abs(g1))), g1.shape)
  eps = 1e-2
  up = self_ce(head, inter["block"][1].at[i].add(eps), labels)
  down = self_ce(head, inter["block"][1].at[i].add(-eps), labels)
  np.testing.assert_allclose((up - down) / (2 * eps), g1[i], rtol=2e-2)


@pytest.mark.parametrize("kind", NEW_BLOCK_LOSSES)
def test_a_float_candidate_in_a_float_model_scores_zero(setup, kind):
  model, params, images, _ = setup
  float_model = {"Transformer": {}}  # no site quantized: the FP model
  evaluator = BlockEvaluator(model, params, search_config(**SMALL),
                             fitness=Fitness(block_loss=kind, output_loss="kl"))
  caches = evaluator.caches(float_model, images)
  sample = evaluator.token_sample(jax.random.PRNGKey(0), caches, 0)
  for block in (0, 1):
    score = evaluator.candidate_fitness(block, params, float_model, caches, sample, {})
    assert abs(float(score)) < 1e-6, (kind, block)


@pytest.mark.parametrize("kind", BLOCK_LOSSES)
def test_vmapped_scores_equal_one_by_one_with_each_block_loss(setup, kind):
  model, params, images, qparams = setup
  fit = Fitness(block_loss=kind, output_loss="kl")
  evaluator = BlockEvaluator(model, params, search_config(**SMALL), fitness=fit)
  caches = evaluator.caches(qparams, images)
  assert (caches.fisher is not None) == (kind == "fisher")
  sample = evaluator.token_sample(jax.random.PRNGKey(0), caches, 0)
  population = EvolQ(population_size=5).initial_population(
      jax.random.PRNGKey(3), qparams["Transformer"]["encoderblock_0"])
  scores = evaluator.score(0, population, qparams, caches, sample)
  fp_logits, fp = model.apply({"params": params}, images, return_intermediates=True)
  fisher = fisher_weights(model, params, images)[0] if kind == "fisher" else None
  for i in range(5):  # the whole model, one candidate at a time: no caches
    q = with_block(qparams, 0, take(population, i))
    logits, inter = model.apply({"params": params, "quant": q}, images, return_intermediates=True)
    want = fit(inter["block"][0], fp["block"][0], logits, fp_logits, sample, fisher)
    np.testing.assert_allclose(scores[i], want, rtol=1e-5)
  assert len(set(np.round(np.asarray(scores), 7))) > 1


def test_fitness_is_read_from_the_config_and_defaults_to_l_c2_plus_kl():
  fit = Fitness.from_config(search_config())
  assert (fit.block_loss, fit.output_loss, fit.temperature) == ("contrastive", "kl", 3.0)
  paper = Fitness.from_config(search_config(output_loss="contrastive", block_loss="cosine"))
  assert (paper.block_loss, paper.output_loss) == ("cosine", "contrastive")
  assert not fit.needs_fisher and Fitness(block_loss="fisher").needs_fisher
  assert not Fitness(block_loss="fisher", w_block=0.0).needs_fisher
