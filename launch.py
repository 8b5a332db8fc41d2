"""clamp_jax command line.

  python launch.py --config=configs/fmnist_vit.py[:args] --workdir=DIR [--mode=quantize|generate|eval|train]
                   [--config.a.b=value ...]
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from clamp_jax import files
from clamp_jax.evaluate import evaluate_params
from clamp_jax.models import build_model
from clamp_jax.models.checkpoints import load_checkpoint
from clamp_jax.ptq import GENERATED_SOURCES, generate_calibration, quantize
from clamp_jax.train import train

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
  if not config.model.checkpoint:
    raise app.UsageError("--mode=eval needs config.model.checkpoint (a .npz or .safetensors file)")
  model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
  result = evaluate_params(config, build_model(model_cfg), params)
  result["checkpoint"] = config.model.checkpoint
  print(f"float top-1: {result['top1']:.2f}% on {result['n']} images "
        f"({config.data.name}, {result['seconds']:.1f}s)", flush=True)
  files.write_json(os.path.join(workdir, "eval.json"), result)
  return result


def run_train(config, workdir: str) -> dict:
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
    raise app.UsageError(f"--mode=generate needs config.calib.source in {GENERATED_SOURCES}, "
                         f"got {config.calib.source!r}")
  model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
  _, report = generate_calibration(config, build_model(model_cfg), params, workdir)
  print(f"generated {config.calib.num_images} images ({config.calib.source}): FP model "
        f"mis-predicts {report['misprediction_rate']:.1f}% of targets, "
        f"{report['steps_per_second']:.2f} steps/s; {workdir}/generated.png", flush=True)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  config = FLAGS.config
  with open(os.path.join(FLAGS.workdir, "config.json"), "w") as f:
    f.write(config.to_json(indent=2))
  logging.info("config:\n%s", config)
  modes = {"quantize": run_quantize, "generate": run_generate, "eval": run_eval,
           "train": run_train}
  modes[FLAGS.mode](config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
