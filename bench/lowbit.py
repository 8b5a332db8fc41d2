"""Low-bit experiments in one process: quantizer options, site sensitivity, calibration sources.

Choices are made on held-in TRAINING images (the last --heldin images of the training split,
none of them a calibration image); `--split=test` reports on the test split instead (for the
final tables only, never to choose). Each row: mean and spread (min..max) over --seeds
calibration seeds.

  # quantizer options at low bits, min-max start, gaussian and real calibration, 3 seeds
  python bench/lowbit.py --mode=options --presets=w4a4,w3a4,w4a3,w2a8 --sources=gaussian,real
  # one site kind at 4 bits, the rest W4/A8
  python bench/lowbit.py --mode=sensitivity --sources=real
  # the second model: --checkpoint=checkpoints/fmnist_vit_gap8.npz --heads=4

Variants (`--variants`, each `name=field:value;field:value` of config.quant, or a known name):
see VARIANTS.
"""

import functools
import os
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clamp_jax import data as data_lib  # noqa: E402
from clamp_jax.data.calibration import calibration_images  # noqa: E402
from clamp_jax.data.preprocess import normalize  # noqa: E402
from clamp_jax.generate import generate  # noqa: E402
from clamp_jax.models import build_model  # noqa: E402
from clamp_jax.models.checkpoints import load_checkpoint  # noqa: E402
from clamp_jax.models.quantized import MATMUL_INPUT_SITES  # noqa: E402
from clamp_jax.models.reparam import calibrate_model  # noqa: E402
from clamp_jax.pipeline import generation_config  # noqa: E402
from configs import fmnist_vit  # noqa: E402

flags.DEFINE_enum("mode", "options", ["options", "sensitivity"], "experiment")
flags.DEFINE_string("checkpoint", "", "float checkpoint (default: the reference model)")
flags.DEFINE_integer("heads", 0, "attention heads of the checkpoint (0: the config's)")
flags.DEFINE_list("presets", ["w4a4"], "bit presets of configs/fmnist_vit.py")
flags.DEFINE_list("sources", ["gaussian", "real"], "calibration sources: gaussian, real, clamp, psaq")
flags.DEFINE_list("variants", ["plain", "default"], "config.quant variants (see VARIANTS)")
flags.DEFINE_integer("seeds", 3, "calibration seeds per row")
flags.DEFINE_integer("heldin", 2000, "held-in training images (the last of the training split)")
flags.DEFINE_enum("split", "heldin", ["heldin", "test"], "where top-1 is measured")
flags.DEFINE_integer("num_images", 32, "calibration images")
FLAGS = flags.FLAGS

# Named variants of config.quant (on top of the preset). "plain": no reparameterization,
# uniform everything, log2 softmax off; "default": the config's defaults.
VARIANTS = {
    "default": {},
    "plain": dict(reparam=False, softmax="float"),
    "no_reparam": dict(reparam=False),
    "log2": dict(softmax="log2"),
    "float_softmax": dict(softmax="float"),
    "twin": dict(gelu="twin"),
    "pct": dict(a_observer="percentile"),
    "omse": dict(a_observer="omse"),
    "w_omse": dict(w_observer="omse"),
    "omse_all": dict(a_observer="omse", w_observer="omse"),
    "omse_all_twin": dict(a_observer="omse", w_observer="omse", gelu="twin"),
    "pct_twin": dict(a_observer="percentile", gelu="twin"),
    "omse_twin": dict(a_observer="omse", gelu="twin"),
    "all_sites": dict(sites="all"),
}


def parse_variant(spec: str) -> tuple:
  if spec in VARIANTS:
    return spec, VARIANTS[spec]
  name, _, fields = spec.partition("=")
  overrides = {}
  for item in filter(None, fields.split(";")):
    key, _, value = item.partition(":")
    overrides[key] = type(fmnist_vit.get_config().quant[key])(value) if value not in (
        "True", "False") else value == "True"
  return name, overrides


def setup(preset: str):
  config = fmnist_vit.get_config(preset)
  if FLAGS.checkpoint:
    config.model.checkpoint = FLAGS.checkpoint
  if FLAGS.heads:
    config.model.num_heads = FLAGS.heads
  config.calib.num_images = FLAGS.num_images
  model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
  return config, build_model(model_cfg), params


def real_choice(seed: int, n_train: int) -> np.ndarray:
  """The training indices `calibration_images` draws for source `real` and `seed`."""
  return np.random.default_rng(seed).choice(n_train, FLAGS.num_images, replace=False)


def eval_images(config):
  """`(images, labels)` of --split: the test split, or the last --heldin training images less
  any that a `real` calibration seed draws."""
  if FLAGS.split == "test":
    images, labels = data_lib.load_arrays(config.data, "test")
  else:
    images, labels = data_lib.load_arrays(config.data, "train")
    keep = np.arange(len(labels) - FLAGS.heldin, len(labels))
    drawn = np.concatenate([real_choice(s, len(labels)) for s in range(FLAGS.seeds)])
    keep = np.setdiff1d(keep, drawn)
    images, labels = images[keep], labels[keep]
  return normalize(images, config.data.mean, config.data.std), labels


def calib(config, model, params, source: str, seed: int, cache: dict):
  """Calibration images of `source` and `seed` (generated ones once per seed)."""
  key = (source, seed)
  if key not in cache:
    config = config.copy_and_resolve_references()
    config.calib.update(source=source, seed=seed)
    if source in ("clamp", "psaq"):
      config.generate.seed = seed
      cache[key] = np.asarray(generate(generation_config(config), model, params, None)[0])
    else:
      cache[key] = calibration_images(config)
  return cache[key]


@functools.lru_cache(maxsize=4)
def predictor(model):
  """One jitted argmax forward per model (compiled once per QuantParams structure)."""
  return jax.jit(lambda p, q, x: jnp.argmax(model.apply({"params": p, "quant": q}, x), -1))


def top1(model, params, qparams, images, labels, batch=500):
  apply = predictor(model)
  correct = 0
  for i in range(0, len(labels), batch):
    correct += int((np.asarray(apply(params, qparams, images[i:i + batch])) ==
                    labels[i:i + batch]).sum())
  return 100.0 * correct / len(labels)


def row(cells):
  print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def stats(values):
  v = np.asarray(values)
  return f"{v.mean():.2f} ({v.min():.2f}..{v.max():.2f})"


def options():
  row(["bits", "variant", "overrides"] + FLAGS.sources)
  row(["---"] * (3 + len(FLAGS.sources)))
  cache = {}
  for preset in FLAGS.presets:
    config, model, params = setup(preset)
    images, labels = eval_images(config)
    for spec in FLAGS.variants:
      name, overrides = parse_variant(spec)
      qcfg = config.quant.copy_and_resolve_references()
      qcfg.update(overrides)
      cells = []
      for source in FLAGS.sources:
        accs = []
        for seed in range(FLAGS.seeds):
          x = calib(config, model, params, source, seed, cache)
          p, q, _ = calibrate_model(model, params, x, qcfg)
          accs.append(top1(model, p, q, images, labels))
        cells.append(stats(accs))
      row([preset.upper(), name, overrides or "-"] + cells)
  fp = top1(model, params, {}, images, labels)
  print(f"\nFP top-1 on these images: {fp:.2f}; {FLAGS.split}, {len(labels)} images")


def sensitivity():
  """Each activation site kind at 4 bits, the rest W4/A8 (per-tensor min-max, no reparam)."""
  from clamp_jax.quant import params as qp
  config, model, params = setup("w4a8")
  images, labels = eval_images(config)
  cache = {}
  qcfg8 = config.quant.copy_and_resolve_references()
  qcfg8.reparam = False
  qcfg4 = qcfg8.copy_and_resolve_references()
  qcfg4.a_bits = 4
  names = [n for n in MATMUL_INPUT_SITES if n != "pre_logits_out"]
  row(["site at 4 bits (rest W4/A8)"] + FLAGS.sources)
  row(["---"] * (1 + len(FLAGS.sources)))
  for name in ["none"] + names:
    cells = []
    for source in FLAGS.sources:
      accs = []
      for seed in range(FLAGS.seeds):
        x = calib(config, model, params, source, seed, cache)
        q8 = qp.flatten(calibrate_model(model, params, x, qcfg8)[1])
        q4 = qp.flatten(calibrate_model(model, params, x, qcfg4)[1])
        mixed = {path: q4[path] if path.rsplit("/", 1)[-1] == name else site
                 for path, site in q8.items()}
        accs.append(top1(model, params, qp.unflatten(mixed), images, labels))
      cells.append(stats(accs))
    row([name] + cells)


def main(_):
  t0 = time.time()
  {"options": options, "sensitivity": sensitivity}[FLAGS.mode]()
  print(f"\n{time.time() - t0:.0f} s; checkpoint {FLAGS.checkpoint or 'reference'}; "
        f"{FLAGS.seeds} seeds x {FLAGS.num_images} calibration images")


if __name__ == "__main__":
  app.run(main)
