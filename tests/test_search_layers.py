"""The whole-model search of a foreign linen model quantized by `models.intercept`."""

import json
import os
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import numpy as np
import pytest

from clamp_jax.models.intercept import Rule, apply_quantized_layers, calibrate_layers
from clamp_jax.quant.params import flatten
from clamp_jax.search import EvolQ, LayersEvaluator, search_config, search_layers
from clamp_jax.search.fitness import output_loss
from clamp_jax.search.strategy import take

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(passes=2, generations=3, population=6, children=6, tournament=3)


class ConvMlp(nn.Module):
  """A model we did not write: conv, then an MLP head with dropout (off unless `train`)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv")(x))
    x = nn.relu(nn.Dense(32, name="fc")(x.reshape(x.shape[0], -1)))
    return nn.Dense(10, name="head")(nn.Dropout(0.5, deterministic=not train)(x))


@pytest.fixture(scope="module")
def setup():
  model = ConvMlp()
  images = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 3))
  variables = model.init(jax.random.PRNGKey(1), images)
  qparams, _ = calibrate_layers(model, variables, [Rule(".*", w_bits=3, a_bits=4)], images)
  return model, variables, images, qparams


def loss(model, variables, qparams, images, cfg):
  """The fitness of `qparams`, without the evaluator."""
  return float(output_loss(apply_quantized_layers(model, variables, qparams, images),
                           model.apply(variables, images), cfg.output_loss, cfg.temperature))


def test_vmapped_scores_equal_one_by_one(setup):
  model, variables, images, qparams = setup
  cfg = search_config(**SMALL)
  population = EvolQ(population_size=5).initial_population(jax.random.PRNGKey(2), qparams)
  evaluator = LayersEvaluator(model, variables, cfg)
  scores = evaluator.score(None, population, qparams, evaluator.caches(qparams, images), None)
  want = [loss(model, variables, take(population, i), images, cfg) for i in range(5)]
  np.testing.assert_allclose(scores, want, rtol=1e-5)
  assert len(set(np.round(want, 6))) > 1
  chunked = LayersEvaluator(model, variables, search_config(**SMALL, chunk_size=2))
  np.testing.assert_allclose(
      chunked.score(None, population, qparams, chunked.caches(qparams, images), None), scores,
      rtol=1e-6)


@pytest.mark.parametrize("kind", ["contrastive", "kl"])
def test_search_lowers_the_output_loss_below_the_min_max_start(setup, kind):
  model, variables, images, qparams = setup
  cfg = search_config(**SMALL, output_loss=kind)
  searched, history = search_layers(model, variables, qparams, images, cfg, train=False)
  start = loss(model, variables, qparams, images, cfg)
  end = loss(model, variables, searched, images, cfg)
  assert end < start
  np.testing.assert_allclose([history[0]["fitness_before"], history[-1]["fitness_after"]],
                             [start, end], rtol=1e-5)
  assert [h["pass_"] for h in history] == [0, 1]
  assert all(h["fitness_after"] <= h["fitness_before"] for h in history)
  assert jax.tree_util.tree_structure(searched) == jax.tree_util.tree_structure(qparams)
  for path, site in flatten(qparams).items():
    assert flatten(searched)[path].scale.shape == site.scale.shape
    np.testing.assert_array_equal(flatten(searched)[path].bits, site.bits)
  again, _ = search_layers(model, variables, qparams, images, cfg)  # same seed, same result
  for a, b in zip(flatten(searched).values(), flatten(again).values()):
    np.testing.assert_array_equal(a.scale, b.scale)


@flax.struct.dataclass
class ClassifierOutput:
  """A structured output like HuggingFace's `FlaxSequenceClassifierOutput`."""
  logits: jax.Array
  features: jax.Array


class StructuredOutput(nn.Module):
  """`ConvMlp` returning a dataclass instead of logits."""

  @nn.compact
  def __call__(self, x):
    features = nn.relu(nn.Dense(16, name="fc")(x.reshape(x.shape[0], -1)))
    return ClassifierOutput(logits=nn.Dense(10, name="head")(features), features=features)


def test_output_fn_reads_the_logits_of_a_structured_output(setup):
  _, _, images, _ = setup
  model = StructuredOutput()
  variables = model.init(jax.random.PRNGKey(3), images)
  qparams, _ = calibrate_layers(model, variables, [Rule(".*", w_bits=3, a_bits=4)], images)
  cfg = search_config(**SMALL, output_loss="kl")
  with pytest.raises(TypeError, match="ClassifierOutput.*output_fn"):
    search_layers(model, variables, qparams, images, cfg)
  searched, history = search_layers(model, variables, qparams, images, cfg,
                                    output_fn=lambda out: out.logits)
  fp = model.apply(variables, images).logits
  fitness = lambda q: float(output_loss(apply_quantized_layers(model, variables, q, images).logits,
                                        fp, "kl", cfg.temperature))
  np.testing.assert_allclose([history[0]["fitness_before"], history[-1]["fitness_after"]],
                             [fitness(qparams), fitness(searched)], rtol=1e-5)
  assert fitness(searched) < fitness(qparams)


SHARDED_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, "tests")
from test_search_layers import ConvMlp
from clamp_jax.models.intercept import Rule, calibrate_layers
from clamp_jax.quant.params import flatten
from clamp_jax.search import population_mesh, search_config, search_layers
model, images = ConvMlp(), jax.random.normal(jax.random.PRNGKey(0), (8, 6, 6, 3))
variables = model.init(jax.random.PRNGKey(1), images)
qparams, _ = calibrate_layers(model, variables, [Rule(".*", w_bits=3, a_bits=4)], images)
cfg = search_config(passes=1, generations=2, population=5, children=5, tournament=3)
out = {}
for n in (1, 3):  # 5 candidates on 3 devices: padded to 6
  searched, _ = search_layers(model, variables, qparams, images, cfg,
                              mesh=population_mesh(jax.devices()[:n]))
  out[n] = {p: np.asarray(s.scale).tolist() for p, s in flatten(searched).items()}
print(json.dumps(out))
"""


def test_three_device_sharded_search_equals_one_device():
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=3")
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for path in out["1"]:
    np.testing.assert_allclose(out["1"][path], out["3"][path], rtol=1e-6, err_msg=path)
