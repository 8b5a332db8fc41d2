"""Candidate evaluations per second of the search evaluator, four ways, side by side.

  python bench/search_throughput.py [--models=reference,deit_s] [--population=16] [--images=32]

(a) Evol-Q style: the whole quantized model, one candidate at a time;
(b) block-cached, one candidate at a time (blocks l..L-1 and the head from the cached input);
(c) block-cached, the population vmapped on one device;
(d) (c) sharded over 2 host devices (`--xla_force_host_platform_device_count=2`);
(e) block-cached, one program scoring the population with `lax.map` in chunks of --chunk.
Also the evaluator's achieved FLOP/s (XLA's cost analysis / measured time) beside a plain
float32 matmul's FLOP/s measured in the same run. Prints a markdown table.
"""

import functools
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=2").strip()

import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clamp_jax.models import build_model, model_config  # noqa: E402
from clamp_jax.models.checkpoints import load_checkpoint  # noqa: E402
from clamp_jax.models.quantized import calibrate, quant_config  # noqa: E402
from clamp_jax.search import BlockEvaluator, EvolQ, population_mesh, search_config, with_block  # noqa: E402
from clamp_jax.search.fitness import Fitness  # noqa: E402
from clamp_jax.search.strategy import take  # noqa: E402
from configs import fmnist_vit  # noqa: E402

flags.DEFINE_list("models", ["reference", "deit_s"], "reference and/or deit_s")
flags.DEFINE_integer("population", 16, "candidates per measurement")
flags.DEFINE_integer("images", 32, "calibration images (reference model)")
flags.DEFINE_integer("deit_images", 8, "calibration images (DeiT-S at 224)")
flags.DEFINE_integer("chunk", 1, "candidates per lax.map step of row (e) (config.search.chunk_size)")
flags.DEFINE_integer("repeats", 3, "timed repetitions (best is reported)")
FLAGS = flags.FLAGS


def best_time(fn, repeats):
  jax.block_until_ready(fn())  # compile and warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def matmul_flops_per_s(repeats):
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return 2 * 2048 ** 3 / best_time(lambda: f(a), repeats)


def setup(name):
  if name == "reference":
    cfg = fmnist_vit.get_config()
    model_cfg, params = load_checkpoint(cfg.model.checkpoint, cfg.model)
    n = FLAGS.images
  else:
    model_cfg = model_config("DeiT-S")
    params = build_model(model_cfg).init(jax.random.PRNGKey(0),
                                         jnp.zeros((1, 224, 224, 3)))["params"]
    n = FLAGS.deit_images
  model = build_model(model_cfg)
  images = jax.random.normal(jax.random.PRNGKey(1), (n, model_cfg.image_size,
                                                     model_cfg.image_size, model_cfg.channels))
  qparams = calibrate(model, params, images, quant_config(w_bits=4, a_bits=8))
  return model, params, images, qparams


def measure(name):
  model, params, images, qparams = setup(name)
  block = model.num_layers // 2  # a middle block: blocks l..L-1 cost about half the model
  cfg = search_config(block_tokens=256)
  k = FLAGS.population
  one_device = BlockEvaluator(model, params, cfg, population_mesh(jax.devices()[:1]))
  two_devices = BlockEvaluator(model, params, cfg, population_mesh(jax.devices()[:2]))
  chunked = BlockEvaluator(model, params, search_config(block_tokens=256, chunk_size=FLAGS.chunk),
                           population_mesh(jax.devices()[:1]))
  caches = one_device.caches(qparams, images)
  sample = one_device.token_sample(jax.random.PRNGKey(0), caches, block)
  population = EvolQ(population_size=k).initial_population(
      jax.random.PRNGKey(2), qparams["Transformer"][f"encoderblock_{block}"])
  candidates = [take(population, i) for i in range(k)]

  @jax.jit
  def whole_model(params, qparams, images, caches, candidate):
    """Evol-Q: the quantized model from the images; FP targets cached as in (b)-(d)."""
    variables = {"params": params, "quant": with_block(qparams, block, candidate)}
    logits, inter = model.apply(variables, images, return_intermediates=True)
    return Fitness.from_config(cfg)(inter["block"][block], caches.fp_blocks[block], logits,
                                    caches.fp_logits, sample)

  cached_one = jax.jit(functools.partial(one_device.candidate_fitness, block))
  rows = {
      "(a) whole model, one at a time": lambda: [whole_model(params, qparams, images, caches, c)
                                                 for c in candidates],
      "(b) block-cached, one at a time": lambda: [cached_one(params, qparams, caches, sample, c)
                                                  for c in candidates],
      "(c) block-cached, vmapped": lambda: one_device.score(block, population, qparams, caches, sample),
      "(d) vmapped, sharded over 2 devices": lambda: two_devices.score(block, population, qparams,
                                                                       caches, sample),
      f"(e) block-cached, lax.map in chunks of {FLAGS.chunk}": lambda: chunked.score(
          block, population, qparams, caches, sample),
  }
  flops_c = BlockEvaluator._score.lower(one_device, block, params, population, qparams, caches, sample) \
      .compile().cost_analysis()
  flops_c = flops_c[0]["flops"] if isinstance(flops_c, list) else flops_c["flops"]
  results = {label: k / best_time(fn, FLAGS.repeats) for label, fn in rows.items()}
  return block, model.num_layers, images.shape[0], results, flops_c


def main(_):
  print(f"devices: {jax.devices()}")
  matmul = matmul_flops_per_s(FLAGS.repeats)
  print(f"\nplain float32 matmul (2048^3): {matmul / 1e9:.1f} GFLOP/s\n")
  for name in FLAGS.models:
    block, depth, n, results, flops = measure(name)
    base = results["(a) whole model, one at a time"]
    print(f"### {name}: {n} images, block {block} of {depth}, population {FLAGS.population}\n")
    print("| evaluator | candidates/s | vs (a) |")
    print("| --- | --- | --- |")
    for label, rate in results.items():
      print(f"| {label} | {rate:.2f} | {rate / base:.1f}x |")
    achieved = flops * results["(c) block-cached, vmapped"] / FLAGS.population
    print(f"\n(c) achieves {achieved / 1e9:.1f} GFLOP/s = {achieved / matmul:.0%} of the matmul's "
          f"({flops / FLAGS.population / 1e9:.2f} GFLOP per candidate)\n")


if __name__ == "__main__":
  app.run(main)
