"""Time to a quantized model: the whole CLAMP cycle, split into its parts (issue 12).

  python bench/cycle_time.py [--models=deit_s,deit_t,deit_b,vit_b,swin_t,swin_s]
      [--populations=15,64,256] [--images=32,128] [--passes=P]
      [--variants=model.compute_dtype=bfloat16,search.precompile=False]
      [--evaluator_populations=15,64,256] [--bits=w4a8] [--eval_images=16] [--quick]

Each model is a config of `configs/` (`NAME[:ARG]`, e.g. `deit_s`, `fmnist_vit:tiny`) and runs
with that config's schedule (the ImageNet configs hold the paper's: 500 generation steps,
P = 10 passes, C = 6 generations, K = 15, 50-step refreshes every C/2 generations), its
weights random (every kernel and embedding N(0, 0.02^2), as timm initialises), through the
pipeline's own `start`, `run_search` and `finish`. Evaluation reads `--eval_images` random
images (an image folder written for the run; the Fashion-MNIST configs read their test split).
`--populations` sets K (population and children), `--images` the calibration images,
`--passes` P (0: the config's; fewer passes repeat less of the same per-pass work),
`--variants` one config override `FIELD=VALUE` per extra row (`model.compute_dtype=bfloat16`:
the matmuls' operands; `search.precompile=False`: each block's evaluator program compiled when
the search reaches it; `reconstruct.share_programs=False`: a reconstruction program per block;
`compilation_cache=DIR` twice: a run that fills jax's compilation cache, then one that reads it).
The first model runs at every K, image count and variant, the others at the first K and image
count, each row in its own process (so its peak memory and
compilations are its own). After every block a row logs its split so far (a `split` JSON
line), so a row stopped early still tells where its time went. `--quick`: `fmnist_vit:tiny`
with the `tiny` config's schedule (refreshing every C/2 = 1 generation), a couple of minutes
on a CPU.

Per row: wall time of the parts ("generation": the first, "calibration": the LayerNorm
reparameterization and min-max, "refresh", "search": the rest of the block-wise search,
"checkpoint": the run state saved after the start and every block, "reconstruction": the
rounding reconstruction where the config turns it on (<= 4-bit weights and >= 4-bit activations,
e.g. `--bits=w4a4`), "evaluation": the min-max,
float and quantized top-1 with the export and report, "compile": jax's tracing, lowering and
XLA compilation wherever it happened, the union of the spans `jax.monitoring` reports, taken out
of the part it happened in; "other": the rest), so the parts sum to the total. Peak memory:
the device's `peak_bytes_in_use` where `memory_stats()` has it, else the process's max RSS.
Candidates/s: candidates scored in the search over the "search" seconds. The evaluator's
FLOP/s: XLA's cost analysis of the middle block's program (K candidates, one device) over the
best-of-3 time of the program the search runs for it, against a square matmul of the compute dtype timed in the same process;
`--evaluator_populations` also measures it at those K (same block, images and QuantParams): how
far more candidates per program fill the device.
"""

import ast
import collections
import contextlib
import functools
import importlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from absl import logging as absl_logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clamp_jax import pipeline  # noqa: E402
from clamp_jax.compilation_cache import compilation_cache  # noqa: E402
from clamp_jax.generate.config import METHODS as GENERATED_SOURCES  # noqa: E402
from clamp_jax.models import build_model  # noqa: E402
from clamp_jax.models.reparam import fold  # noqa: E402
from clamp_jax.run_state import RunCheckpoints  # noqa: E402
from clamp_jax.search import BlockEvaluator, population_mesh  # noqa: E402
from clamp_jax.search.evaluator import block_sites  # noqa: E402
from clamp_jax.search.loop import search_order, strategy_from  # noqa: E402
from clamp_jax.search.reconstruct import reconstruct  # noqa: E402

flags.DEFINE_list("models", ["deit_s", "deit_t", "deit_b", "vit_b", "swin_t", "swin_s"],
                  "configs of configs/, NAME[:ARG]; the first one also runs every K and image count")
flags.DEFINE_list("populations", ["15"], "population sizes K (population = children)")
flags.DEFINE_list("images", ["32"], "calibration image counts")
flags.DEFINE_list("variants", [], "FIELD=VALUE config overrides, one extra row each")
flags.DEFINE_integer("passes", 0, "search passes P (0: the config's)")
flags.DEFINE_list("evaluator_populations", [], "also measure the evaluator's FLOP/s at these K")
flags.DEFINE_string("bits", "", "a bit preset (configs/common.py) added to every config's argument")
flags.DEFINE_integer("eval_images", 16, "random images the evaluations read")
flags.DEFINE_bool("quick", False, "fmnist_vit:tiny, the tiny config's schedule (a CPU test)")
flags.DEFINE_string("json_out", "", "also write the rows as JSON here")
flags.DEFINE_string("row_out", "", "(internal) run the one row given, write its JSON here")
FLAGS = flags.FLAGS

QUICK = dict(models=["fmnist_vit:tiny"], populations=["4"], images=["8"])
PHASES = ("generation", "calibration", "refresh", "search", "checkpoint", "reconstruction",
          "evaluation", "compile", "other")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
REPEATS = 3


class PhaseClock:
  """`clock(name)`: a context timing the phase `name` (a `pipeline.Phase`). Phases nest and each
  second counts once, for the innermost phase open; the root phase is "other". Compilation
  (the spans of `COMPILE_EVENTS`, overlapping ones merged) counts as "compile", not as the
  phase it happened in."""

  def __init__(self, log=None):
    """`log(message)`: the top-level phases as they start, and the split after each block."""
    self.stack, self.seconds, self.log = ["other"], collections.defaultdict(float), log
    self.spans = collections.defaultdict(list)
    self.start = self.mark = time.time()
    jax.monitoring.register_event_time_span_listener(self._on_span)

  def _on_span(self, event, start, end, **_):
    if event in COMPILE_EVENTS:
      self.spans[self.stack[-1]].append((start, end))

  def _switch(self):
    now = time.time()
    self.seconds[self.stack[-1]] += now - self.mark
    self.mark = now

  @contextlib.contextmanager
  def __call__(self, name: str):
    if self.log and len(self.stack) == 1:
      self.log(f"{name} ({time.time() - self.start:.0f}s)")
    self._switch()
    self.stack.append(name)
    try:
      yield
    finally:
      self._switch()
      self.stack.pop()
      if self.log and name == "checkpoint":
        self.log("split " + json.dumps({k: round(v, 1) for k, v in self.split().items()}))

  def split(self) -> dict:
    """Seconds per phase of `PHASES` (compilation apart) and "total", so far."""
    self._switch()
    times = {name: self.seconds[name] for name in PHASES}
    for name, spans in self.spans.items():
      compiled, end = 0.0, -np.inf
      for s, e in sorted(spans):  # the union of the spans
        compiled += max(0.0, e - max(s, end))
        end = max(end, e)
      times[name] -= compiled
      times["compile"] += compiled
    times["total"] = time.time() - self.start
    return times


def best_time(fn) -> float:
  """Best of `REPEATS` timed calls of `fn`, after one untimed."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(REPEATS):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def matmul_flops_per_s(dtype) -> float:
  """FLOP/s of an n x n matmul in `dtype` (n = 2048 on a CPU, 8192 on an accelerator)."""
  n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n ** 3 / best_time(lambda: f(a))


def random_params(model, config):
  """Random weights as timm initialises a ViT: every leaf of >= 2 dimensions (kernels,
  embeddings, position tables) N(0, 0.02^2), norm scales 1, biases 0 (drawn with numpy: no
  compilation before the clock starts)."""
  m = config.model
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, m.image_size, m.image_size, m.channels)))["params"]
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if leaf.ndim >= 2:
      return jnp.asarray(0.02 * rng.standard_normal(leaf.shape), leaf.dtype)
    return (jnp.ones if path[-1].key == "scale" else jnp.zeros)(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def override(config, variant: str) -> None:
  """Applies `variant` (`FIELD=VALUE`, e.g. `search.precompile=False`; "" for none) to `config`."""
  if not variant:
    return
  path, _, text = variant.partition("=")
  *parents, field = path.split(".")
  section = functools.reduce(getattr, parents, config)
  if field not in section:
    raise ValueError(f"--variants: config has no field {path!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text  # a bare string, e.g. bfloat16
  setattr(section, field, value)


def row_config(spec: str, population: int, num_images: int, variant: str, data_dir: str):
  """The config `spec` with K, the calibration images, the `variant`, --passes, the evaluation
  on random images (an image folder written into `data_dir` for folder configs) and, with
  --quick, the tiny schedule."""
  name, _, arg = spec.partition(":")
  config = importlib.import_module(f"configs.{name}").get_config(
      ",".join(a for a in (arg, FLAGS.bits) if a))
  if FLAGS.quick:
    tiny = importlib.import_module("configs.fmnist_vit").get_config("tiny")
    config.generate.update({k: tiny.generate[k] for k in ("steps", "refresh_steps",
                                                          "warmup_steps")})
    config.search.update(passes=tiny.search.passes, generations=tiny.search.generations,
                         refresh_every=max(1, tiny.search.generations // 2))
  config.search.update(population=population, children=population,
                       tournament=min(config.search.tournament, population))
  config.calib.num_images = num_images
  override(config, variant)
  if FLAGS.passes:
    config.search.passes = FLAGS.passes
  config.eval.update(num_images=FLAGS.eval_images, batch_size=FLAGS.eval_images)
  if config.data.name == "folder":
    size, rng = config.model.image_size, np.random.default_rng(0)
    for i in range(FLAGS.eval_images):
      folder = os.path.join(data_dir, f"class_{i % 2}")
      os.makedirs(folder, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(
          os.path.join(folder, f"{i}.png"))
    config.data.dir = data_dir
  return config


def candidates_scored(config, num_blocks: int) -> int:
  """Candidates the search scores: per block the start population, `children` per generation
  and the population again after each refresh."""
  cfg = config.search
  refreshes = 0
  if config.calib.source in GENERATED_SOURCES and cfg.refresh_every:
    refreshes = sum(1 for g in range(1, cfg.generations) if g % cfg.refresh_every == 0)
  per_block = cfg.population + cfg.generations * cfg.children + refreshes * cfg.population
  return len(search_order(cfg, num_blocks)) * per_block


def evaluator_flops_per_s(config, model, params, state, populations) -> dict:
  """`{K: achieved FLOP/s}` of the search evaluator's program for each K of `populations`: the
  middle block, K candidates, the run's final images and QuantParams, on one device. The FLOPs
  are XLA's cost analysis of the block's own (unrolled) program: it counts a `fori_loop`'s body
  once, so the shared program's own count would be too low; the time is that of the program
  the search runs (`BlockEvaluator.program`)."""
  evaluator = BlockEvaluator(model, params, config.search, population_mesh(jax.devices()[:1]))
  block = model.num_layers // 2
  caches = evaluator.caches(state.qparams, state.images)
  sample = evaluator.token_sample(jax.random.PRNGKey(0), caches, block)
  rates = {}
  for k in populations:
    search = config.search.copy_and_resolve_references()
    search.update(population=k, children=k, tournament=min(search.tournament, k))
    population = strategy_from(search, config.quant).initial_population(
        jax.random.PRNGKey(1), block_sites(state.qparams, block))
    args = (evaluator.params, population, state.qparams, caches, sample)
    cost = BlockEvaluator._score.lower(evaluator, block, *args).compile().cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    scorer, block_arg = evaluator.program(block, state.qparams)
    rates[k] = flops / best_time(lambda: scorer(evaluator, block_arg, *args))
  return rates


def peak_memory():
  """`(bytes, source)`: the device's peak where it reports one, else the process's max RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"], "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def run_row(spec: str, population: int, num_images: int, variant: str) -> dict:
  """One cycle (start, search, finish) of `spec` at K = `population`, `num_images` calibration
  images and the config override `variant`, timed by `PhaseClock`."""
  label = f"{spec} K={population} N={num_images} {variant}".strip()

  def log(message):
    print(f"[{label}] {message}", file=sys.stderr, flush=True)

  with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
    config = row_config(spec, population, num_images, variant, os.path.join(tmp, "data"))
    stack.enter_context(compilation_cache(config.compilation_cache))
    model = build_model(config.model)
    params = random_params(model, config)
    workdir = os.path.join(tmp, "run")
    checkpoints = RunCheckpoints(os.path.join(workdir, "state"))
    clock = PhaseClock(log)
    state = pipeline.start(config, model, params, workdir, phase=clock)
    with clock("checkpoint"):
      checkpoints.save(state)
    params = fold(params, state.reparam)
    with clock("search"):
      state = pipeline.run_search(config, model, params, state, checkpoints, workdir,
                                  phase=clock)
    rounded = None
    if config.reconstruct.enabled:
      with clock("reconstruction"):
        rounded, state.qparams, _ = reconstruct(model, params, state.qparams, state.images,
                                                config.reconstruct)
    with clock("evaluation"):
      pipeline.finish(config, model, params, state, workdir, rounded)
    times = clock.split()
    checkpoints.close()
    log(f"done ({times['total']:.0f}s); measuring the evaluator and a matmul")
    memory, memory_source = peak_memory()  # before the measurements below
    evaluator = evaluator_flops_per_s(
        config, model, params, state,
        [population] + [int(k) for k in FLAGS.evaluator_populations if int(k) != population])
  matmul = matmul_flops_per_s(jnp.dtype(config.model.compute_dtype))
  candidates = candidates_scored(config, model.num_layers)
  return dict(model=spec, population=population, images=num_images, variant=variant,
              compute_dtype=config.model.compute_dtype,
              passes=config.search.passes, seconds=times, peak_memory_bytes=memory,
              memory_source=memory_source, candidates=candidates,
              candidates_per_s=candidates / times["search"],
              evaluator_flops_per_s=evaluator[population], matmul_flops_per_s=matmul,
              evaluator_flops_per_s_at=evaluator, device=str(jax.devices()[0]),
              jax=jax.__version__)


def rows(models, populations, images, variants):
  """`(model, K, N, variant)`: the first model at every K, every N and every variant (the
  others at their first; variant "" is the config as it is), the other models at the first K and
  N."""
  k0, n0 = populations[0], images[0]
  first = [(models[0], k, n0, "") for k in populations]
  first += [(models[0], k0, n, "") for n in images[1:]]
  first += [(models[0], k0, n0, v) for v in variants]
  return first + [(m, k0, n0, "") for m in models[1:]]


def table(results) -> str:
  """The rows as a markdown table."""
  head = ["model", "variant", "P", "K", "N", *PHASES, "total", "peak memory (GiB)", "candidates/s",
          "evaluator GFLOP/s", "matmul GFLOP/s", "evaluator / matmul"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  for r in results:
    s = r["seconds"]
    cells = [r["model"], r["variant"] or "-", r["passes"], r["population"], r["images"],
             *(f"{s[p]:.1f}" for p in PHASES), f"{s['total']:.1f}",
             f"{r['peak_memory_bytes'] / 2 ** 30:.2f}", f"{r['candidates_per_s']:.1f}",
             f"{r['evaluator_flops_per_s'] / 1e9:.1f}", f"{r['matmul_flops_per_s'] / 1e9:.1f}",
             f"{r['evaluator_flops_per_s'] / r['matmul_flops_per_s']:.0%}"]
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  return "\n".join(lines)


def evaluator_table(results) -> str:
  """The evaluator's FLOP/s at each measured K, against the row's matmul."""
  lines = ["| model | variant | N | K | evaluator GFLOP/s | evaluator / matmul |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in results:
    for k, rate in r["evaluator_flops_per_s_at"].items():
      lines.append(f"| {r['model']} | {r['variant'] or '-'} | {r['images']} | {k} | "
                   f"{rate / 1e9:.1f} | {rate / r['matmul_flops_per_s']:.0%} |")
  return "\n".join(lines)


def run_process(command) -> None:
  """Runs `command` to its end; a SIGTERM to this process (e.g. `timeout`) stops it too."""
  process = subprocess.Popen(command)

  def stop(*_):
    process.terminate()
    sys.exit(f"stopped during {command[2]}")

  signal.signal(signal.SIGTERM, stop)
  process.wait()


def main(_):
  package = os.path.dirname(os.path.abspath(pipeline.__file__))
  absl_logging.get_absl_handler().addFilter(  # this package's lines and warnings, as the CLI
      lambda r: r.levelno >= logging.WARNING or r.pathname.startswith(package))
  if FLAGS.row_out:
    result = run_row(FLAGS.models[0], int(FLAGS.populations[0]), int(FLAGS.images[0]),
                     FLAGS.variants[0] if FLAGS.variants else "")
    with open(FLAGS.row_out, "w") as f:
      json.dump(result, f)
    return
  if FLAGS.quick:
    for name, value in QUICK.items():
      if not FLAGS[name].present:
        FLAGS[name].value = value
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "row.json")
    for model, k, n, variant in rows(FLAGS.models, [int(k) for k in FLAGS.populations],
                                     [int(n) for n in FLAGS.images], FLAGS.variants):
      print(f"running {model} K={k} N={n} {variant}", flush=True)
      run_process([sys.executable, os.path.abspath(__file__), f"--models={model}",
                   f"--populations={k}", f"--images={n}", f"--variants={variant}",
                   f"--passes={FLAGS.passes}",
                   f"--evaluator_populations={','.join(FLAGS.evaluator_populations)}",
                   f"--bits={FLAGS.bits}", f"--eval_images={FLAGS.eval_images}",
                   f"--quick={FLAGS.quick}", f"--row_out={out}"])
      if not os.path.exists(out):  # its log says why; the other rows still run
        print(f"{model} K={k} N={n} {variant} failed", flush=True)
        continue
      with open(out) as f:
        results.append(json.load(f))
      os.remove(out)
      if FLAGS.json_out:  # after every row: a command stopped later keeps the rows it finished
        with open(FLAGS.json_out, "w") as f:
          json.dump(results, f, indent=1)
  if not results:
    sys.exit("every row failed")
  r = results[0]
  print(f"\n{r['device']}, jax {r['jax']}; peak memory: {r['memory_source']}; compile: jax's "
        f"trace/lower/compile spans; seconds per part of the cycle:\n")
  print(table(results))
  print("\nThe evaluator's program (middle block) at each K measured:\n")
  print(evaluator_table(results))


if __name__ == "__main__":
  app.run(main)
