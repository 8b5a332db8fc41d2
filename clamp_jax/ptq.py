"""`--mode=quantize`: calibrate `QuantParams` on a few images, evaluate, save and export."""

import os
import time

import jax
import ml_collections
import numpy as np

from clamp_jax import files
from clamp_jax.data.calibration import calibration_images
from clamp_jax.evaluate import evaluate_params
from clamp_jax.models import build_model
from clamp_jax.models.checkpoints import load_checkpoint
from clamp_jax.models.quantized import calibrate, export_integer
from clamp_jax.quant import params as qparams_lib
from clamp_jax.search import search


def quantize(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Min-max PTQ of `config.model.checkpoint`, then the block-wise search when
  `config.search.enabled`; writes results.json, quant_params/, quantized.npz."""
  t0 = time.time()
  model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
  model = build_model(model_cfg)
  images = calibration_images(config)
  qparams = jax.block_until_ready(calibrate(model, params, images, config.quant))
  calib_seconds = time.time() - t0
  fp = evaluate_params(config, model, params)
  extra = {}
  if config.search.enabled:
    extra["minmax_top1"] = evaluate_params(config, model, params, {"quant": qparams})["top1"]
    t_search = time.time()
    qparams, history = search(model, params, qparams, jax.numpy.asarray(images), config.search)
    extra.update(search_seconds=time.time() - t_search, search_history=history)
  quant = evaluate_params(config, model, params, {"quant": qparams})
  result = dict(fp_top1=fp["top1"], quant_top1=quant["top1"], n=quant["n"], **extra,
                calib_source=config.calib.source, calib_images=int(images.shape[0]),
                calib_seconds=calib_seconds, seconds=time.time() - t0,
                **qparams_lib.bit_summary(qparams))
  qparams_lib.save(os.path.join(workdir, "quant_params"), qparams)
  with files.atomic_path(os.path.join(workdir, "quantized.npz")) as tmp:
    np.savez(tmp, **export_integer(params, qparams))
  files.write_json(os.path.join(workdir, "results.json"), result)
  return result
