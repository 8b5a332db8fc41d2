"""clamp_jax command line.

  python launch.py --config=configs/fmnist_vit.py[:args] --workdir=DIR [--mode=quantize|generate|eval|train]
                   [--config.a.b=value ...]
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from clamp_jax import files
from clamp_jax.evaluate import evaluate_params
from clamp_jax.generate.config import METHODS as GENERATED_SOURCES
from clamp_jax.models import build_model
from clamp_jax.models.checkpoints import load_checkpoint
from clamp_jax.models.quantized import load_quantized
from clamp_jax.pipeline import generate_images, quantize
from clamp_jax.train import train
from clamp_jax.validate import validate_run

config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/fmnist_vit.py:tiny.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "quantize", ["quantize", "generate", "eval", "train"],
                  "quantize: calibrate and evaluate the quantized model; generate: synthesize "
                  "calibration images (config.calib.source psaq or clamp); eval: float top-1 "
                  "of config.model.checkpoint; train: train a float model.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def run_eval(config, workdir: str) -> dict:
  """Top-1 of the float checkpoint, or of a run's quantized export (`config.model.quantized`)."""
  validate_run(config, "eval")
  if config.model.quantized:
    model_cfg, params, qparams = load_quantized(config.model.quantized, config.model)
    result = evaluate_params(config, build_model(model_cfg), params, {"quant": qparams})
    result["quantized"] = config.model.quantized
    kind = "quantized"
  else:
    model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
    result = evaluate_params(config, build_model(model_cfg), params)
    result["checkpoint"] = config.model.checkpoint
    kind = "float"
  print(f"{kind} top-1: {result['top1']:.2f}% on {result['n']} images "
        f"({config.data.name}, {result['seconds']:.1f}s)", flush=True)
  files.write_json(os.path.join(workdir, "eval.json"), result)
  return result


def run_train(config, workdir: str) -> dict:
  validate_run(config, "train")
  result = train(config, workdir)
  print(f"trained: test top-1 {result['top1']:.2f}% in {result['train_seconds']:.0f}s; "
        f"float checkpoint {result['checkpoint']}", flush=True)
  files.write_json(os.path.join(workdir, "train.json"), result)
  return result


def run_quantize(config, workdir: str) -> dict:
  r = quantize(config, workdir)
  print(f"W{r['w_bits']:g}/A{r['a_bits']:g} ({config.calib.source} calibration, "
        f"{r['calib_images']} images): top-1 {r['quant_top1']:.2f}% "
        f"(float {r['fp_top1']:.2f}%) in {r['seconds']:.1f}s; results in {workdir}", flush=True)
  return r


def run_generate(config, workdir: str) -> dict:
  if config.calib.source not in GENERATED_SOURCES:
    raise app.UsageError(f"--mode=generate needs config.calib.source in {list(GENERATED_SOURCES)}, "
                         f"got {config.calib.source!r}")
  validate_run(config, "generate")
  model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
  _, _, report = generate_images(config, build_model(model_cfg), params, workdir)
  print(f"generated {config.calib.num_images} images ({config.calib.source}): FP model "
        f"mis-predicts {report['misprediction_rate']:.1f}% of targets, "
        f"{report['steps_per_second']:.2f} steps/s; {workdir}/generated.png", flush=True)
  return report


def differing_fields(old: dict, new: dict, prefix: str = "") -> list:
  """Dotted names of the fields where two config dicts differ."""
  names = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      names += differing_fields(a, b, f"{prefix}{key}.")
    elif a != b:
      names.append(f"{prefix}{key}")
  return names


def record_config(config, workdir: str, mode: str) -> None:
  """Writes `workdir/config.json`. A resumable run (quantize, train) stops if the workdir holds
  a run of another config, since resuming it would mix the two."""
  path = os.path.join(workdir, "config.json")
  new = json.loads(config.to_json())
  if mode in ("quantize", "train") and os.path.exists(path):
    with open(path) as f:
      changed = differing_fields(json.load(f), new)
    if changed:
      raise app.UsageError(f"{workdir} holds a run of another config (differing: "
                           f"{', '.join(changed)}); use another --workdir to start a new run")
  files.write_json(path, new)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.get("distributed"):  # multi-host: every process runs this same command
    jax.distributed.initialize()
  os.makedirs(FLAGS.workdir, exist_ok=True)
  record_config(config, FLAGS.workdir, FLAGS.mode)
  logging.info("config:\n%s", config)
  modes = {"quantize": run_quantize, "generate": run_generate, "eval": run_eval,
           "train": run_train}
  modes[FLAGS.mode](config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
