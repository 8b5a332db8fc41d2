"""`--mode=quantize`: calibrate `QuantParams` on a few images, evaluate, save and export."""

import os
import time

import jax
import ml_collections
import numpy as np

from clamp_jax import files
from clamp_jax.data.calibration import calibration_images
from clamp_jax.evaluate import evaluate_params
from clamp_jax.generate import generate, save_png_grid
from clamp_jax.models import build_model
from clamp_jax.models.checkpoints import load_checkpoint
from clamp_jax.models.quantized import calibrate, export_integer
from clamp_jax.quant import params as qparams_lib
from clamp_jax.search import search
from clamp_jax.search.budget import report as budget_report


GENERATED_SOURCES = ("psaq", "clamp")


def generate_calibration(config: ml_collections.ConfigDict, model, params, workdir: str):
  """Synthesises `config.calib.num_images` images with `config.calib.source` ("psaq" or
  "clamp") as the method; writes `generated.npz` (images, targets), `generated.png` and
  `generate.json` (mis-prediction rate, loss curve, steps/s) to `workdir`."""
  gen_config = ml_collections.ConfigDict(config.to_dict())
  gen_config.generate.update(method=config.calib.source, num_images=config.calib.num_images)
  images, targets, _, report = generate(gen_config, model, params, None)
  with files.atomic_path(os.path.join(workdir, "generated.npz")) as tmp:
    np.savez(tmp, images=np.asarray(images), targets=np.asarray(targets))
  save_png_grid(os.path.join(workdir, "generated.png"), images, config.data.mean, config.data.std)
  files.write_json(os.path.join(workdir, "generate.json"), report)
  return images, report


def quantize(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Min-max PTQ of `config.model.checkpoint`, then the block-wise search when
  `config.search.enabled`; writes results.json, quant_params/, quantized.npz."""
  if config.quant.mixed and not config.search.enabled:
    raise ValueError("config.quant.mixed=True searches bits: it needs config.search.enabled=True")
  t0 = time.time()
  model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
  model = build_model(model_cfg)
  generation = {}
  if config.calib.source in GENERATED_SOURCES:
    images, report = generate_calibration(config, model, params, workdir)
    generation = dict(misprediction_rate=report["misprediction_rate"],
                      generate_steps_per_second=report["steps_per_second"])
  else:
    images = calibration_images(config)
  qparams = jax.block_until_ready(calibrate(model, params, images, config.quant))
  calib_seconds = time.time() - t0
  fp = evaluate_params(config, model, params)
  extra = {}
  if config.search.enabled:
    extra["minmax_top1"] = evaluate_params(config, model, params, {"quant": qparams})["top1"]
    t_search = time.time()
    qparams, history = search(model, params, qparams, jax.numpy.asarray(images), config.search,
                              quant_cfg=config.quant)
    extra.update(search_seconds=time.time() - t_search, search_history=history)
  quant = evaluate_params(config, model, params, {"quant": qparams})
  result = dict(fp_top1=fp["top1"], quant_top1=quant["top1"], n=quant["n"], **extra,
                **generation,
                calib_source=config.calib.source, calib_images=int(images.shape[0]),
                calib_seconds=calib_seconds, seconds=time.time() - t0,
                **qparams_lib.bit_summary(qparams), **budget_report(qparams))
  qparams_lib.save(os.path.join(workdir, "quant_params"), qparams)
  with files.atomic_path(os.path.join(workdir, "quantized.npz")) as tmp:
    np.savez(tmp, **export_integer(params, qparams))
  files.write_json(os.path.join(workdir, "results.json"), result)
  return result
