"""Does the rounding reconstruction (`config.reconstruct`, AdaRound) pay, in which form, and on
which images? Top-1 of the start (percentile min-max, no search) and of the same start after
each reconstruction variant, per preset and calibration source, mean (min..max) over seeds, on
bench/lowbit.py's held-in training images (never the test split unless --split=test).

  python bench/reconstruct.py --presets=w3a4 --sources=clamp,real --seeds=3 \
      --variants="brecq=steps:100;loss:mse;quantized_input:1.0,qdrop=steps:100;quantized_input:0.5"
  # a second model: --checkpoint=checkpoints/fmnist_vit_gap8.npz
"""

import os
import sys
import time

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lowbit  # noqa: E402  (its flags: --checkpoint, --presets, --sources, --seeds, --split, ...)
from clamp_jax.models.reparam import calibrate_model  # noqa: E402
from clamp_jax.search.reconstruct import reconstruct, reconstruct_config  # noqa: E402

FLAGS = flags.FLAGS
FLAGS.set_default("variants", ["default="])  # lowbit's --variants: here `name=field:value;...`
FLAGS.set_default("sources", ["clamp", "real"])


def variant(spec: str):
  """`(name, config.reconstruct)` of `name=field:value;...` (fields over the defaults)."""
  name, _, fields = spec.partition("=")
  cfg = reconstruct_config(enabled=True)
  for item in filter(None, fields.split(";")):
    field, _, value = item.partition(":")
    cfg[field] = value == "True" if value in ("True", "False") else type(cfg[field])(value)
  return name, cfg


def main(_):
  variants = [variant(spec) for spec in FLAGS.variants]
  for name, cfg in variants:
    print(f"{name}: {cfg.to_dict()}")
  print(f"top-1 on {FLAGS.split}; {FLAGS.num_images} calibration images; "
        f"checkpoint {FLAGS.checkpoint or 'reference'}\n")
  lowbit.row(["bits", "source", "start"] + [name for name, _ in variants] + ["seconds/run"])
  lowbit.row(["---"] * (3 + len(variants) + 1))
  cache = {}
  for preset in FLAGS.presets:
    config, model, float_params = lowbit.setup(preset)
    images, labels = lowbit.eval_images(config)
    for source in FLAGS.sources:
      top1 = np.zeros((FLAGS.seeds, 1 + len(variants)))
      seconds = []
      for seed in range(FLAGS.seeds):
        x = lowbit.calib(config, model, float_params, source, seed, cache)
        params, qparams, _ = calibrate_model(model, float_params, x, config.quant)
        top1[seed, 0] = lowbit.top1(model, params, qparams, images, labels)
        for i, (_, cfg) in enumerate(variants, 1):
          t = time.time()
          rounded, learned, _ = reconstruct(model, params, qparams, x, cfg)
          seconds.append(time.time() - t)
          top1[seed, i] = lowbit.top1(model, rounded, learned, images, labels)
        print(f"  {preset} {source} seed {seed}: " + " ".join(f"{v:.2f}" for v in top1[seed]),
              flush=True)
      lowbit.row([preset.upper(), source] + [lowbit.stats(top1[:, i])
                                             for i in range(top1.shape[1])] +
                 [f"{np.mean(seconds):.0f}"])


if __name__ == "__main__":
  app.run(main)
