"""Which search fitness tracks top-1? Spearman correlation over candidates around the start.

For the last, middle and first block, --candidates mutations of the min-max start's block (the
search's relative mutation, `scale * |1 + U(-r, r)|`, r cycling through --radii; the other
blocks at the start) are scored by every fitness of `fitnesses` on the calibration images, and
by top-1 of the whole model on held-in TRAINING images (bench/lowbit.py's: the last --heldin
training images less any calibration draw; never the test split). Each cell is -rho (Spearman
of fitness vs top-1): lower fitness is better, so positive = the fitness tracks accuracy.
Beside them, with the same held-in images: +rho with the cross-entropy to the true labels (CE),
a smoother measure of the same predictions; the mutation radius as a baseline "fitness"; and
each measure's split-half rho (Spearman of the candidates' values on the even vs the odd
held-in batches): how reproducible its ranking is, a rough ceiling for any fitness.

  python bench/fitness_correlation.py --presets=w4a4,w3a4,w2a8 --sources=clamp
  python bench/fitness_correlation.py --presets=w4a4 --sources=real
  # a second model: --checkpoint=PATH.npz --heads=H
"""

import functools
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lowbit  # noqa: E402  (its flags: --checkpoint, --heads, --presets, --sources, --heldin, ...)
from clamp_jax.models.reparam import calibrate_model  # noqa: E402
from clamp_jax.search import BlockEvaluator, EvolQ  # noqa: E402
from clamp_jax.search.evaluator import block_key  # noqa: E402
from clamp_jax.search.fitness import Fitness  # noqa: E402
from clamp_jax.search.strategy import stack  # noqa: E402

flags.DEFINE_integer("candidates", 112, "mutated candidates per block (the start is added)")
flags.DEFINE_list("radii", ["0.02", "0.05", "0.1", "0.2"], "relative mutation radii, cycled")
flags.DEFINE_integer("batch", 500, "held-in images per top-1 step")
flags.DEFINE_integer("seed", 0, "candidates' and calibration seed")
flags.DEFINE_string("quant", "", "config.quant overrides, `field:value;...` (a_observer:minmax)")
FLAGS = flags.FLAGS
FLAGS.set_default("sources", ["clamp"])


def fitnesses(elements: int) -> tuple:
  """`(name, Fitness)` pairs scored (lower is better); `elements`: tokens x width of a block
  output, which turns the mean Fisher term into the per-image sum (a second-order estimate of
  twice the CE increase, on KL's scale)."""
  return (
      ("L_C2 + L_O, T=3 (paper)", Fitness()),
      ("L_C2 + L_O, T=0.5", Fitness(temperature=0.5)),
      ("L_C2 + L_O, T=0.1", Fitness(temperature=0.1)),
      ("L_C2, T=3", Fitness(w_output=0.0)),
      ("L_O contrastive, T=3", Fitness(w_block=0.0)),
      ("KL", Fitness(w_block=0.0, output_loss="kl")),
      ("logits MSE", Fitness(w_block=0.0, output_loss="mse")),
      ("block MSE", Fitness(block_loss="mse", w_output=0.0)),
      ("block cosine", Fitness(block_loss="cosine", w_output=0.0)),
      ("block Fisher", Fitness(block_loss="fisher", w_output=0.0)),
      ("Fisher + KL", Fitness(block_loss="fisher", output_loss="kl")),
      ("Fisher x N*D/2 + KL", Fitness(block_loss="fisher", output_loss="kl",
                                      w_block=elements / 2)),
      ("MSE + KL", Fitness(block_loss="mse", output_loss="kl")),
      ("cosine + KL", Fitness(block_loss="cosine", output_loss="kl")),
      ("L_C2 (T=3) + KL", Fitness(output_loss="kl")),
  )


RADIUS = "(baseline: the mutation radius)"


def candidates(key, center: dict, radii, n: int):
  """`(population, radius [n + 1])`: `center` (radius 0) first, then `n` relative mutations of
  it, the radius cycling through `radii`."""
  radius = [0.0] + [radii[i % len(radii)] for i in range(n)]
  mutants = [EvolQ(r_low_bits=r, r_high_bits=r, relative=True).mutate(k, center)
             for k, r in zip(jax.random.split(key, n), radius[1:])]
  return stack([center] + mutants), np.asarray(radius)


@functools.partial(jax.jit, static_argnums=(0, 1))
def outputs(evaluator, block, params, qparams, block_in, population):
  """`(block outputs, logits)` of every candidate, one after another."""
  one = functools.partial(evaluator.candidate_outputs, block, params, qparams, block_in)
  return jax.lax.map(one, population)


@functools.partial(jax.jit, static_argnums=(0, 1))
def correct(evaluator, block, params, qparams, block_in, labels, population):
  """`[K, 2]`: correct predictions and summed cross-entropy (true labels) of every candidate on
  one batch."""
  def one(candidate):
    _, logits = evaluator.candidate_outputs(block, params, qparams, block_in, candidate)
    log_p = jax.nn.log_softmax(logits)
    return jnp.stack([jnp.sum(jnp.argmax(logits, -1) == labels),
                      -jnp.sum(jnp.take_along_axis(log_p, labels[:, None], axis=-1))])
  return jax.lax.map(one, population)


@functools.partial(jax.jit, static_argnums=0)
def block_inputs(model, params, qparams, images):
  """`[L, B, N, D]`: the stream entering each block under `qparams`."""
  return model.apply({"params": params, "quant": qparams}, images,
                     return_intermediates=True)[1]["block_in"]


def heldin_streams(model, params, qparams, images, labels) -> list:
  """`(block inputs, labels)` of the held-in images, in batches of --batch."""
  return [(block_inputs(model, params, qparams, images[i:i + FLAGS.batch]),
           labels[i:i + FLAGS.batch]) for i in range(0, len(labels), FLAGS.batch)]


def heldin_metrics(evaluator, block, params, qparams, streams, population):
  """`{"top-1": [K] percent, "CE": [K]}` of every candidate on the held-in images (from the
  stream entering `block`), and each one's split-half rho (Spearman of its values on the even
  vs the odd batches)."""
  sums = np.stack([correct(evaluator, block, params, qparams, block_in[block], labels,
                           population) for block_in, labels in streams])  # [batches, K, 2]
  sizes = np.asarray([len(labels) for _, labels in streams], np.float64)
  halves = [sums[h::2].sum(0) / sizes[h::2].sum() for h in (0, 1)]
  means = sums.sum(0) / sizes.sum()
  metrics = {"top-1": 100.0 * means[:, 0], "CE": means[:, 1]}
  split = {k: stats.spearmanr(halves[0][:, i], halves[1][:, i])[0]
           for i, k in enumerate(metrics)}
  return metrics, split


@functools.partial(jax.jit, static_argnums=(0, 1))
def scores(named, block, caches, sample, q_blocks, logits) -> dict:
  """Every fitness of `named` `[K]` from the candidates' outputs."""
  def of(fit):
    return jax.vmap(lambda q, l: fit(q, caches.fp_blocks[block], l, caches.fp_logits, sample,
                                     caches.fisher[block]))(q_blocks, logits)
  return {name: of(fit) for name, fit in named}


def correlations(fitness: dict, metrics: dict) -> dict:
  """`{metric: {fitness: rho}}`, signed so that positive = the fitness tracks the metric: -rho
  with top-1 (lower fitness, higher top-1), +rho with CE."""
  sign = {"top-1": -1.0, "CE": 1.0}
  return {m: {name: sign[m] * stats.spearmanr(f, v)[0] for name, f in fitness.items()}
          for m, v in metrics.items()}


def block_study(evaluator, named, block, params, qparams, caches, sample, streams, key):
  """`(correlations, each fitness at the start, held-in metrics, their split-half rho)`."""
  population, radius = candidates(key, qparams["Transformer"][block_key(block)],
                                  [float(r) for r in FLAGS.radii], FLAGS.candidates)
  q_blocks, logits = outputs(evaluator, block, params, qparams, caches.block_inputs[block],
                             population)
  metrics, split = heldin_metrics(evaluator, block, params, qparams, streams, population)
  out = scores(named, block, caches, sample, q_blocks, logits)
  fitness = {name: np.asarray(out[name]) for name, _ in named}  # in `named`'s order
  start = {k: v[0] for k, v in fitness.items()}
  fitness[RADIUS] = radius
  return correlations(fitness, metrics), start, metrics, split


def study(preset: str, source: str) -> dict:
  """`{block: {metric: {fitness: rho}}}` for one preset and calibration source; prints it."""
  t0 = time.time()
  config, model, params = lowbit.setup(preset)
  config.quant.update(lowbit.parse_variant("quant=" + FLAGS.quant)[1])
  heldin = lowbit.eval_images(config)
  x = lowbit.calib(config, model, params, source, FLAGS.seed, {})  # per preset: Q shapes clamp
  params, qparams, _ = calibrate_model(model, params, x, config.quant)
  evaluator = BlockEvaluator(model, params, config.search, fitness=Fitness(block_loss="fisher"))
  caches = evaluator.caches(qparams, x)
  named = fitnesses(int(np.prod(caches.fp_blocks.shape[2:])))
  key = jax.random.PRNGKey(FLAGS.seed)
  sample = evaluator.token_sample(key, caches)
  streams = heldin_streams(model, params, qparams, *heldin)
  num = model.num_layers
  blocks = sorted({num - 1, num // 2, 0}, reverse=True)
  results, starts, notes = {}, {}, []
  for block in blocks:
    t = time.time()
    results[block], starts[block], metrics, split = block_study(
        evaluator, named, block, params, qparams, caches, sample, streams,
        jax.random.fold_in(key, block))
    acc = metrics["top-1"]
    notes.append(f"block {block}: top-1 start {acc[0]:.2f}, candidates {acc.min():.2f}.."
                 f"{acc.max():.2f}; split-half rho top-1 {split['top-1']:+.2f}, CE "
                 f"{split['CE']:+.2f} ({time.time() - t:.0f} s)")
  print(f"\n### {preset.upper()}, {source} calibration images, {config.quant.a_observer} "
        f"activation start ({FLAGS.candidates} candidates + the start per block)\n")
  table(results, blocks, starts)
  print(f"\nOn {len(heldin[1])} held-in training images:\n" +
        "\n".join(f"- {n}" for n in notes))
  print(f"({time.time() - t0:.0f} s)", flush=True)
  return results


def table(results: dict, columns, starts=None) -> None:
  """Rows: fitnesses; per metric, columns `columns` (keys of `results`) and their mean; with
  `starts`, each fitness at the start (per column)."""
  metrics = list(results[columns[0]])
  extra = ["at the start (" + " / ".join(str(c) for c in columns) + ")"] if starts else []
  lowbit.row(["fitness (Spearman, + = tracks)"] +
             [f"{m}, {c}" for m in metrics for c in list(columns) + ["mean"]] + extra)
  lowbit.row(["---"] * (1 + len(metrics) * (len(columns) + 1) + len(extra)))
  for name in results[columns[0]][metrics[0]]:
    cells = [name]
    for m in metrics:
      values = [results[c][m][name] for c in columns]
      cells += [f"{v:+.2f}" for v in values] + [f"**{np.mean(values):+.2f}**"]
    if starts:
      cells.append(" / ".join(f"{starts[c][name]:.3g}" for c in columns)
                   if name in starts[columns[0]] else "-")
    lowbit.row(cells)


def mean_over_blocks(per_block: dict) -> dict:
  """`{metric: {fitness: mean rho over the blocks}}`."""
  first = next(iter(per_block.values()))
  return {m: {name: np.mean([r[m][name] for r in per_block.values()]) for name in first[m]}
          for m in first}


def main(_):
  if FLAGS.split != "heldin":
    raise app.UsageError("fitness_correlation measures on held-in training images only")
  t0 = time.time()
  means = {}
  for source in FLAGS.sources:
    for preset in FLAGS.presets:
      means[f"{preset.upper()} {source}"] = mean_over_blocks(study(preset, source))
  if len(means) > 1:
    print("\n### Mean over blocks, per preset and source\n")
    table(means, list(means))
  print(f"\n{time.time() - t0:.0f} s; checkpoint {FLAGS.checkpoint or 'reference'}; "
        f"{FLAGS.num_images} calibration images, seed {FLAGS.seed}")


if __name__ == "__main__":
  app.run(main)
