"""The layer-wise evolutionary search: strategy, block-cached vmapped evaluator, sharding, loop."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models.quantized import quant_config
from clamp_jax.quant.params import ACTIVATION, WEIGHT, SiteQuant, flatten
from clamp_jax.search import BlockEvaluator, EvolQ, population_mesh, search, search_config, with_block
from clamp_jax.search.fitness import Fitness
from clamp_jax.search.loop import search_block, strategy_from
from clamp_jax.search.strategy import take
from conftest import calibrated_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(passes=1, generations=2, population=4, children=4, tournament=3, block_tokens=24)


@pytest.fixture(scope="module")
def setup():
  return calibrated_tiny(quant_config(w_bits=4, a_bits=4))[1:]


def block_sites(qparams, block):
  return qparams["Transformer"][f"encoderblock_{block}"]


def test_mutation_moves_scales_by_at_most_r_and_keeps_bits_and_zero_points(setup):
  *_, qparams = setup
  center = block_sites(qparams, 1)
  strategy = EvolQ(population_size=5)
  population = strategy.initial_population(jax.random.PRNGKey(0), center)
  for path, site in flatten(center).items():
    mutated = flatten(population)[path]
    np.testing.assert_array_equal(mutated.scale[0], site.scale)  # the centre is kept first
    assert np.abs(mutated.scale[1:] - site.scale).max() <= 1e-3 + 1e-7  # 4 bits: r = 1e-3
    assert np.abs(mutated.scale[1:] - site.scale).max() > 0
    np.testing.assert_array_equal(mutated.bits[1:], np.broadcast_to(site.bits, mutated.bits[1:].shape))
    np.testing.assert_array_equal(mutated.zero_point[1:],
                                  np.broadcast_to(site.zero_point, mutated.zero_point[1:].shape))


@pytest.mark.parametrize("kind,bits,radius", [(ACTIVATION, 2, 0.3), (ACTIVATION, 3, 0.3),
                                               (ACTIVATION, 4, 0.05), (WEIGHT, 3, 0.05),
                                               (WEIGHT, 4, 0.05), (ACTIVATION, 8, 0.01),
                                               (WEIGHT, 8, 0.01)])
def test_relative_mutation_radius_follows_the_site_bits_and_kind(kind, bits, radius):
  site = SiteQuant(scale=jnp.full((64,), 2.0), zero_point=jnp.zeros((64,)), bits=jnp.float32(bits),
                   kind=kind)
  strategy = EvolQ(population_size=50, r_low_bits=0.05, r_high_bits=0.01,
                   r_3_bit_activations=0.3, relative=True)
  ratio = strategy.initial_population(jax.random.PRNGKey(0), {"s": site})["s"].scale[1:] / 2.0
  spread = np.abs(np.asarray(ratio) - 1.0).max()
  assert radius * 0.9 < spread <= radius + 1e-6  # 3,136 draws of U(-r, r) reach near r


def test_tell_never_loses_the_best_and_children_replace_the_worst():
  strategy = EvolQ(population_size=4, num_children=3)
  population = {"x": jnp.arange(4.0)}
  state = strategy.init(population, jnp.array([3.0, 1.0, 2.0, 5.0]))
  assert float(state.fitness[0]) == 1.0 and float(state.population["x"][0]) == 1.0
  children = {"x": jnp.array([10.0, 11.0, 12.0])}
  state = strategy.tell(state, children, jnp.array([4.0, jnp.nan, 0.5]))
  np.testing.assert_array_equal(state.fitness, [0.5, 1.0, 2.0, 3.0])
  np.testing.assert_array_equal(state.population["x"], [12.0, 1.0, 2.0, 0.0])
  state = strategy.tell(state, children, jnp.array([9.0, 9.0, 9.0]))  # all worse: nothing changes
  np.testing.assert_array_equal(state.fitness, [0.5, 1.0, 2.0, 3.0])


def test_tournament_picks_winners_from_the_population(setup):
  *_, qparams = setup
  strategy = EvolQ(population_size=6, num_children=8, tournament_size=6)
  center = block_sites(qparams, 0)
  population = strategy.initial_population(jax.random.PRNGKey(1), center)
  state = strategy.init(population, jnp.arange(6.0))
  children = strategy.ask(jax.random.PRNGKey(2), state)
  path = "MlpBlock_0/Dense_0/kernel"
  parent_scales = np.asarray(flatten(state.population)[path].scale)
  child_scales = np.asarray(flatten(children)[path].scale)
  # Each child lies within r of some parent, most often of the best (a tournament of 6 of 6).
  nearest = [int(np.argmin(np.abs(parent_scales - c).max(axis=(1, 2)))) for c in child_scales]
  assert all(np.abs(child_scales[i] - parent_scales[n]).max() <= 1e-3 + 1e-7
             for i, n in enumerate(nearest))
  assert nearest.count(0) >= 4


def test_block_cached_vmapped_scores_equal_whole_model_one_by_one(setup):
  model, params, images, qparams = setup
  cfg = search_config(**SMALL)
  evaluator = BlockEvaluator(model, params, cfg)
  caches = evaluator.caches(qparams, images)
  sample = evaluator.token_sample(jax.random.PRNGKey(0), caches, 0)
  population = EvolQ(population_size=6).initial_population(jax.random.PRNGKey(3),
                                                           block_sites(qparams, 0))
  scores = evaluator.score(0, population, qparams, caches, sample)
  fp_logits, fp = model.apply({"params": params}, images, return_intermediates=True)
  for i in range(6):  # the whole model, one candidate at a time: no caches at all
    q = with_block(qparams, 0, take(population, i))
    logits, inter = model.apply({"params": params, "quant": q}, images, return_intermediates=True)
    want = Fitness.from_config(cfg)(inter["block"][0], fp["block"][0], logits, fp_logits, sample)
    np.testing.assert_allclose(scores[i], want, rtol=1e-5)
  assert len(set(np.round(np.asarray(scores), 6))) > 1


def test_one_shared_program_scores_every_block_as_the_blocks_own_programs_do(setup):
  model, params, images, qparams = setup
  shared, own = (BlockEvaluator(model, params, search_config(**SMALL, share_programs=flag))
                 for flag in (True, False))
  assert shared.shares_programs(qparams) and not own.shares_programs(qparams)
  caches = shared.caches(qparams, images)
  for block in range(model.num_layers):  # the last block runs no block after it
    population = EvolQ(population_size=5).initial_population(jax.random.PRNGKey(block),
                                                             block_sites(qparams, block))
    sample = shared.token_sample(jax.random.PRNGKey(0), caches, block)
    np.testing.assert_allclose(shared.score(block, population, qparams, caches, sample),
                               own.score(block, population, qparams, caches, sample), rtol=1e-6)
  pinned = jax.tree_util.tree_map(lambda s: s, qparams)  # another layout in one block: own programs
  pinned["Transformer"]["encoderblock_0"]["ln1"] = qparams["Transformer"]["encoderblock_0"][
      "ln1"].replace(bit_range=(4, 4))
  assert not shared.shares_programs(pinned)


def test_chunked_evaluation_equals_vmapped(setup):
  model, params, images, qparams = setup
  population = EvolQ(population_size=5).initial_population(jax.random.PRNGKey(4),
                                                           block_sites(qparams, 1))
  results = []
  for chunk in (0, 2):
    evaluator = BlockEvaluator(model, params, search_config(**SMALL, chunk_size=chunk))
    caches = evaluator.caches(qparams, images)
    sample = evaluator.token_sample(jax.random.PRNGKey(0), caches, 1)
    results.append(evaluator.score(1, population, qparams, caches, sample))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


def test_search_lowers_the_fitness_below_the_min_max_start(setup):
  model, params, images, qparams = setup
  searched, history = search(model, params, qparams, images,
                             search_config(**dict(SMALL, generations=4)))
  assert [h["block"] for h in history] == [1, 0]  # last to first
  assert all(h["fitness_after"] <= h["fitness_before"] for h in history)
  assert any(h["fitness_after"] < h["fitness_before"] for h in history)
  changed = [not np.array_equal(a.scale, b.scale)
             for a, b in zip(flatten(searched).values(), flatten(qparams).values())]
  assert any(changed)
  again, _ = search(model, params, qparams, images, search_config(**dict(SMALL, generations=4)))
  for a, b in zip(flatten(searched).values(), flatten(again).values()):  # same seed, same result
    np.testing.assert_array_equal(a.scale, b.scale)


def test_precompiled_programs_serve_the_whole_search_and_change_nothing(setup, monkeypatch,
                                                                      request):
  model, params, images, qparams = setup
  cfg = search_config(**dict(SMALL, passes=2, generations=3, population=4, children=3))
  compiled = []  # (precompiling?, the program's name) of each XLA compilation of the search
  precompiling = []

  def listen(event, _, fun_name="", **kw):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append((bool(precompiling), fun_name))

  jax.monitoring.register_event_duration_secs_listener(listen)
  request.addfinalizer(lambda: jax.monitoring.unregister_event_duration_listener(listen))
  precompile = BlockEvaluator.precompile

  def marked(self, *args):
    precompiling.append(True)
    precompile(self, *args)
    precompiling.clear()

  monkeypatch.setattr(BlockEvaluator, "precompile", marked)
  searched, _ = search(model, params, qparams, images, cfg)
  scores = [during for during, name in compiled if name == "jit(_score_shared)"]
  assert scores == [True] * 2  # the population of 4, the 3 children: all before the search
  compiled.clear()
  plain, _ = search(model, params, qparams, images, search_config(**dict(cfg, precompile=False)))
  assert [name for _, name in compiled].count("jit(_score_shared)") == 2  # as they come
  for a, b in zip(flatten(searched).values(), flatten(plain).values()):
    np.testing.assert_array_equal(a.scale, b.scale)


def test_a_refreshed_block_keeps_the_start_and_reports_it_on_the_final_images(setup):
  model, params, images, qparams = setup
  # every token in the block loss, so a score does not depend on the token sample
  cfg = search_config(**dict(SMALL, generations=5, refresh_every=2, block_tokens=10_000))
  evaluator, strategy = BlockEvaluator(model, params, cfg), strategy_from(cfg)
  refreshed = []

  def refresh(current, key):  # new images every refresh: the start's fitness changes with them
    refreshed.append(1)
    return images + jax.random.normal(key, images.shape)

  best, start, after, final = search_block(evaluator, strategy, 1, qparams, images,
                                           jax.random.PRNGKey(3), cfg, refresh=refresh)
  assert len(refreshed) == 2 and not np.array_equal(final, images)
  caches = evaluator.caches(qparams, final)
  start_pop = jax.tree_util.tree_map(lambda a: a[None], block_sites(qparams, 1))
  sample = evaluator.token_sample(jax.random.PRNGKey(0), caches, 1)
  np.testing.assert_allclose(start, evaluator.score(1, start_pop, qparams, caches, sample)[0],
                             rtol=1e-5)
  assert after <= start  # never worse than the start on the images the block ended with


SHARDED_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
sys.path.insert(0, "tests")
from conftest import calibrated_tiny
from clamp_jax.models.quantized import quant_config
from clamp_jax.quant.params import flatten
from clamp_jax.search import population_mesh, search, search_config
assert len(jax.devices()) == 8, jax.devices()
_, model, params, images, qparams = calibrated_tiny(quant_config(w_bits=4, a_bits=4))
scfg = search_config(passes=1, generations=2, population=5, children=7, tournament=3, block_tokens=24)
out = {}
for n in (1, 8):
  searched, _ = search(model, params, qparams, images, scfg, mesh=population_mesh(jax.devices()[:n]))
  out[n] = {p: np.asarray(s.scale).tolist() for p, s in flatten(searched).items()}
print(json.dumps(out))
"""


def test_eight_device_sharded_search_equals_one_device():
  env = dict(os.environ, PYTHONPATH=ROOT,
             XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["1"].keys() == out["8"].keys()
  for path in out["1"]:
    np.testing.assert_array_equal(np.asarray(out["1"][path]), np.asarray(out["8"][path]), err_msg=path)


@pytest.mark.parametrize("field,value", [("population", 0), ("generations", 0),
                                         ("output_loss", "hinge"), ("block_loss", "hinge"),
                                         ("temperature", 0.0)])
def test_impossible_search_settings_are_named(setup, field, value):
  model, params, images, qparams = setup
  with pytest.raises(ValueError, match=f"config.search.{field}"):
    search(model, params, qparams, images, search_config(**{field: value}))


MULTI_PROCESS_SCRIPT = """
import json, sys
import jax
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                           process_id=int(sys.argv[2]), initialization_timeout=120)
import numpy as np
sys.path.insert(0, "tests")
from conftest import calibrated_tiny
from clamp_jax.models.quantized import quant_config
from clamp_jax.quant.params import flatten
from clamp_jax.search import population_mesh, search, search_config
assert len(jax.devices()) == 2 and len(jax.local_devices()) == 1, jax.devices()
_, model, params, images, qparams = calibrated_tiny(quant_config(w_bits=4, a_bits=4))
scfg = search_config(passes=1, generations=2, population=5, children=7, tournament=3, block_tokens=24)
searched, _ = search(model, params, qparams, images, scfg, mesh=population_mesh())
print(json.dumps({p: np.asarray(s.scale).tolist() for p, s in flatten(searched).items()}))
"""


def test_two_process_search_over_jax_distributed_equals_one_device(setup):
  """Two processes (one CPU device each) joined by jax.distributed share the population: both
  end with the result of a one-device run."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = dict(os.environ, PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, "-c", MULTI_PROCESS_SCRIPT, address, str(i)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  model, params, images, qparams = setup
  scfg = search_config(passes=1, generations=2, population=5, children=7, tournament=3,
                       block_tokens=24)
  single, _ = search(model, params, qparams, images, scfg, mesh=population_mesh(jax.devices()[:1]))
  for out, _ in outs:
    result = json.loads(out.strip().splitlines()[-1])
    assert result.keys() == flatten(single).keys()
    for path, site in flatten(single).items():
      np.testing.assert_array_equal(np.asarray(result[path]), np.asarray(site.scale), err_msg=path)
