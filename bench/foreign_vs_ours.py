"""A foreign model vs our ViT on the same weights (issue 11): top-1 at W4/A8 and W4/A4, min-max.

  python bench/foreign_vs_ours.py [--presets=w4a8,w4a4] [--seeds=0,1,2] [--eval_images=0]

The reference checkpoint runs (a) as our ViT, calibrated as `python launch.py
--config=configs/fmnist_vit.py:PRESET,minmax --config.calib.source=real` calibrates it
(`calibrate_model`: RepQ-ViT's LayerNorm reparameterization, 99.99th-percentile activation
ranges, log-sqrt(2) softmax, the `matmul` protocol), and again with
`--config.quant.reparam=False --config.quant.a_observer=minmax`, what the foreign path does; and
(b) converted into HuggingFace's `FlaxViTForImageClassification` (`bench/hf_vit.py`), quantized
by `calibrate_layers` with the same bits (kernels per output channel, inputs per tensor, the
patch embedding's input, the image, at `config.quant.image_bits`, the attention matmuls on).
Both sides calibrate on the same `config.calib.num_images` real training images per seed and are
evaluated by `clamp_jax.evaluate.evaluate_params` on the test split. Prints a markdown table.
"""

import dataclasses
import os
import sys
import time

from absl import app, flags
import flax.linen as nn
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
from clamp_jax.data.calibration import calibration_images  # noqa: E402
from clamp_jax.evaluate import evaluate_params  # noqa: E402
from clamp_jax.models import build_model  # noqa: E402
from clamp_jax.models.checkpoints import load_checkpoint  # noqa: E402
from clamp_jax.models.intercept import Rule, apply_quantized_layers, calibrate_layers  # noqa: E402
from clamp_jax.models.reparam import calibrate_model  # noqa: E402
from configs import fmnist_vit  # noqa: E402
from hf_vit import hf_vit  # noqa: E402

flags.DEFINE_list("presets", ["w4a8", "w4a4"], "bit presets of configs/fmnist_vit.py")
flags.DEFINE_list("seeds", ["0", "1", "2"], "calibration seeds (config.calib.seed)")
flags.DEFINE_integer("eval_images", 0, "test images (0: all 10,000)")
FLAGS = flags.FLAGS

OURS_AS_FOREIGN = dict(reparam=False, a_observer="minmax")


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedForeign:
  """A foreign classifier as `evaluate_params` runs a model: `apply(variables, images)` is the
  logits with the layers and matmuls of `variables["quant"]` quantized (hashed by identity, so
  `evaluate.predict` compiles it once)."""
  module: nn.Module

  def apply(self, variables, images):
    return apply_quantized_layers(self.module, {"params": variables["params"]},
                                  variables.get("quant", {}), images).logits


def foreign_rules(qcfg):
  """`calibrate_layers` rules giving `config.quant`'s bits: the image at `image_bits`."""
  return [Rule(r"patch_embeddings/projection$", w_bits=qcfg.w_bits, a_bits=qcfg.image_bits),
          Rule(r".*", w_bits=qcfg.w_bits, a_bits=qcfg.a_bits)]


def config_for(preset: str, seed: int):
  config = fmnist_vit.get_config(f"{preset},minmax")
  config.calib.update(source="real", seed=seed)
  config.eval.num_images = FLAGS.eval_images
  return config


def row(name, preset, top1s):
  return (f"| {name} | {preset.upper()} | {np.mean(top1s):.2f} | "
          f"{min(top1s):.2f} .. {max(top1s):.2f} |")


def main(_):
  t0 = time.time()
  config = config_for(FLAGS.presets[0], 0)
  model_cfg, params = load_checkpoint(config.model.checkpoint, config.model)
  ours = build_model(model_cfg)
  module, variables = hf_vit(model_cfg, params)
  foreign = QuantizedForeign(module)
  fp_ours = evaluate_params(config, ours, params)
  fp_foreign = evaluate_params(config, foreign, variables["params"])
  images = calibration_images(config)
  gap = np.abs(foreign.apply(variables, images) - ours.apply({"params": params}, images)).max()
  print(f"float: max |HF logits - ours| on {len(images)} calibration images {gap:.2g}")
  lines = ["| model | bits | top-1 mean | range |", "| --- | --- | --- | --- |",
           f"| our ViT, float | - | {fp_ours['top1']:.2f} | - |",
           f"| HF FlaxViT, float | - | {fp_foreign['top1']:.2f} | - |"]
  for preset in FLAGS.presets:
    top1 = {"ours": [], "ours_plain": [], "foreign": []}
    for seed in map(int, FLAGS.seeds):
      config = config_for(preset, seed)
      images = calibration_images(config)
      for key, overrides in (("ours", {}), ("ours_plain", OURS_AS_FOREIGN)):
        qcfg = config.quant.copy_and_resolve_references()
        qcfg.update(overrides)
        folded, qparams, _ = calibrate_model(ours, params, images, qcfg)
        top1[key].append(evaluate_params(config, ours, folded, {"quant": qparams})["top1"])
      plain_logits = ours.apply({"params": folded, "quant": qparams}, images)  # ours_plain's
      qparams, report = calibrate_layers(module, variables, foreign_rules(config.quant), images)
      top1["foreign"].append(evaluate_params(config, foreign, variables["params"],
                                             {"quant": qparams})["top1"])
      gap = np.abs(foreign.apply({**variables, "quant": qparams}, images) - plain_logits).max()
      print(f"{preset} seed {seed}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in top1.items())
            + f"; foreign sites {len(report.matched)}, max |logits - ours_plain's| on the "
            f"calibration images {gap:.2g} ({time.time() - t0:.0f} s)", flush=True)
    lines += [row(f"our ViT `:{preset},minmax` (reparam, percentile)", preset, top1["ours"]),
              row("our ViT, `reparam=False, a_observer=minmax`", preset, top1["ours_plain"]),
              row("HF FlaxViT, `calibrate_layers`", preset, top1["foreign"])]
  print(f"\n{fp_ours['n']} test images, {len(FLAGS.seeds)} seeds x "
        f"{config.calib.num_images} real calibration images; {time.time() - t0:.0f} s, "
        f"jax {jax.__version__}, {jax.devices()[0].platform}\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
