"""clamp_jax command line: the installed `clamp-jax`, or `python launch.py` in a checkout.

  clamp-jax --config=configs/fmnist_vit.py[:args] --workdir=DIR [--mode=quantize|generate|eval|train]
            [--config.a.b=value ...] [--verbosity=1] [--debug]

A user's mistake (a bad flag, an unknown config field or value, a config that cannot run, a
missing or malformed file, a config that contradicts the checkpoint, a workdir another live run
holds) prints one line `error: ...` and exits with status 2; `--debug` shows its traceback too.
The console shows this package's log lines and every warning; `--verbosity=1` adds the config
and the INFO lines of other libraries (orbax, jax); `DIR/config.json` records the config run,
with the model shape read from the checkpoint.
"""

import contextlib
import json
import logging as pylogging
import os
import sys
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import clamp_jax
from clamp_jax import files
from clamp_jax.compilation_cache import check as check_cache, compilation_cache
from clamp_jax.evaluate import evaluate_params
from clamp_jax.generate.config import METHODS as GENERATED_SOURCES
from clamp_jax.models import build_model
from clamp_jax.models.checkpoints.loader import (CheckpointError, CheckpointMismatchError,
                                                 file_model_config, load_checkpoint)
from clamp_jax.models.quantized import load_quantized
from clamp_jax.pipeline import generate_images, quantize
from clamp_jax.search.mixed import BudgetError
from clamp_jax.train import train
from clamp_jax.validate import validate_run
from clamp_jax.workdir_lock import WorkdirBusyError, workdir_lock

config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/fmnist_vit.py:tiny.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_enum("mode", "quantize", ["quantize", "generate", "eval", "train"],
                  "quantize: calibrate and evaluate the quantized model; generate: synthesize "
                  "calibration images (config.calib.source psaq or clamp); eval: float top-1 "
                  "of config.model.checkpoint; train: train a float model.")
flags.DEFINE_bool("debug", False, "Show the traceback of a user error (bad config, malformed "
                  "checkpoint, busy workdir) too.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS

USAGE_STATUS = 2
# A user's mistakes: anything the checks before the run raise, and these while it runs.
PREFLIGHT_ERRORS = (app.UsageError, ValueError, FileNotFoundError)
RUN_ERRORS = (app.UsageError, BudgetError, CheckpointError, CheckpointMismatchError,
              FileNotFoundError, WorkdirBusyError)
FLAG_ERRORS = (flags.Error, AttributeError, KeyError, OSError, ValueError)
PACKAGE_DIR = os.path.dirname(os.path.abspath(clamp_jax.__file__)) + os.sep


def stop(message: str) -> NoReturn:
  """Prints `error: message` and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(USAGE_STATUS)


@contextlib.contextmanager
def user_errors(kinds):
  """Stops with one line on exceptions of `kinds` (re-raised with --debug)."""
  try:
    yield
  except kinds as e:
    if FLAGS.debug:
      raise
    stop(str(e))


def unknown_field(error: KeyError, argv) -> str:
  """ml_collections' KeyError for an unknown field, as the `--config.` flag that names it."""
  name, *hint = str(error.args[0]).splitlines()
  name = name.strip("'\"")
  flag = next((arg.split("=", 1)[0] for arg in argv if arg.startswith("--config.")
               and name in arg.split("=", 1)[0].split(".")), name)
  return "; ".join([f"unknown config field {flag.lstrip('-')}", *hint])


def flag_error(error: Exception, argv) -> str:
  """One line for an error raised while parsing the flags (the config file loads then)."""
  key_error = error if isinstance(error, KeyError) else error.__context__
  if isinstance(error, (AttributeError, KeyError)) and isinstance(key_error, KeyError):
    return unknown_field(key_error, argv)
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if len(lines) > 1:  # the config file raised: the message holds its traceback, cause last
    return f"{lines[0].split(': ', 1)[0]}: {lines[-1]}"
  return lines[0] if lines else type(error).__name__


def config_root(argv) -> str:
  """The folder above the `--config` file's folder ('' without one): configs import
  `configs.common` from there."""
  values = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
  values += [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
  if not values:
    return ""
  return os.path.dirname(os.path.dirname(os.path.abspath(values[0].split(":", 1)[0])))


def parse_flags(argv):
  """absl's flag parsing, with the config's root importable and each error one line."""
  root = config_root(argv)
  if root and root not in sys.path:
    sys.path.insert(0, root)
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises on first use
    return remaining
  except FLAG_ERRORS as e:
    if "--debug" in argv:
      raise
    stop(flag_error(e, argv))


def shown_on_console(record: pylogging.LogRecord) -> bool:
  """Warnings and this package's lines; everything with --verbosity >= 1."""
  return (record.levelno >= pylogging.WARNING or logging.get_verbosity() >= 1
          or record.pathname.startswith(PACKAGE_DIR))


def run_eval(config, workdir: str) -> dict:
  """Top-1 of the float checkpoint, or of a run's quantized export (`config.model.quantized`)."""
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
  model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
  _, _, report = generate_images(config, build_model(model_cfg), params, workdir)
  print(f"generated {config.calib.num_images} images ({config.calib.source}): FP model "
        f"mis-predicts {report['misprediction_rate']:.1f}% of targets, "
        f"{report['steps_per_second']:.2f} steps/s; {workdir}/generated.png", flush=True)
  return report


MODES = {"quantize": run_quantize, "generate": run_generate, "eval": run_eval, "train": run_train}


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


def overridden_model_fields() -> set:
  """The `config.model` fields the command line sets."""
  return {name[len("model."):] for name in config_flags.get_override_values(FLAGS["config"])
          if name.startswith("model.")}


def model_from_file(config, mode: str, pinned) -> dict:
  """`config.model` with what the run's model file determines (as it is without one)."""
  if mode == "eval" and config.model.quantized:
    return load_quantized(config.model.quantized, config.model)[0].to_dict()
  path = config.train.init_checkpoint if mode == "train" else config.model.checkpoint
  return file_model_config(path, config.model, pinned).to_dict() if path else {}


def prepare(config, mode: str) -> None:
  """Checks `config` for `mode` before any work and sets `config.model` to the model the run
  reads (`load_checkpoint`: a `--config.model` field that contradicts the file stops it)."""
  if mode == "generate" and config.calib.source not in GENERATED_SOURCES:
    raise app.UsageError(f"--mode=generate needs config.calib.source in {list(GENERATED_SOURCES)}, "
                         f"got {config.calib.source!r}")
  validate_run(config, mode)
  config.model.update(model_from_file(config, mode, overridden_model_fields()))


def workdir_held(config, workdir: str):
  """The workdir's lock; process 0 holds it for all processes of a multi-host run."""
  if config.get("distributed") and jax.process_index() != 0:
    return contextlib.nullcontext()
  return workdir_lock(workdir)


def main(argv):
  if len(argv) > 1:
    stop(f"unexpected arguments: {argv[1:]}")
  config, mode, workdir = FLAGS.config, FLAGS.mode, FLAGS.workdir
  if config.get("distributed"):  # multi-host: every process runs this same command
    jax.distributed.initialize()
  logging.get_absl_handler().addFilter(shown_on_console)
  cache = config.get("compilation_cache", "")
  with user_errors(PREFLIGHT_ERRORS):
    check_cache(cache)
  with compilation_cache(cache):  # before anything compiles
    with user_errors(PREFLIGHT_ERRORS):
      prepare(config, mode)
    os.makedirs(workdir, exist_ok=True)
    with user_errors(RUN_ERRORS), workdir_held(config, workdir):
      record_config(config, workdir, mode)
      logging.debug("config:\n%s", config)
      MODES[mode](config, workdir)


def run() -> None:
  """The `clamp-jax` console script."""
  app.run(main, flags_parser=parse_flags)
