"""What `config.model.compute_dtype="bfloat16"` costs in top-1: finished runs' quantized exports
evaluated with float32 and with bfloat16 matmul operands, side by side (issue 12).

  python bench/compute_dtype_accuracy.py --workdirs=runs/a,runs/b,... [--num_images=0]

Each workdir is a finished run (its `config.json` and `quantized.npz`); its evaluation split (the
test split for the Fashion-MNIST configs) is read with both dtypes. Prints a markdown table: one
row per workdir, then the mean and range per bit preset (the workdir's `w_bits`/`a_bits`).
"""

import collections
import os
import sys

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clamp_jax.evaluate import evaluate_params  # noqa: E402
from clamp_jax.models import build_model  # noqa: E402
from finished_run import load_export, run_config  # noqa: E402

flags.DEFINE_list("workdirs", [], "finished runs (config.json, quantized.npz)")
flags.DEFINE_integer("num_images", 0, "evaluate only this many images (0: the whole split)")
FLAGS = flags.FLAGS
DTYPES = ("float32", "bfloat16")


def top1_per_dtype(workdir: str):
  """`(bits label, {dtype: top-1})` of `workdir`'s export."""
  config = run_config(workdir)
  config.eval.num_images = FLAGS.num_images
  model_cfg, params, qparams = load_export(workdir, config)
  top1 = {}
  for dtype in DTYPES:
    model_cfg.compute_dtype = dtype
    top1[dtype] = evaluate_params(config, build_model(model_cfg), params,
                                  {"quant": qparams})["top1"]
  label = "mp" if config.quant.get("mixed") else f"W{config.quant.w_bits}/A{config.quant.a_bits}"
  return label, top1


def main(_):
  print("| workdir | bits | float32 top-1 | bfloat16 top-1 | bfloat16 - float32 |")
  print("| --- | --- | --- | --- | --- |")
  per_bits = collections.defaultdict(list)
  for workdir in FLAGS.workdirs:
    label, top1 = top1_per_dtype(workdir)
    diff = top1["bfloat16"] - top1["float32"]
    per_bits[label].append((top1["float32"], top1["bfloat16"], diff))
    print(f"| {workdir} | {label} | {top1['float32']:.2f} | {top1['bfloat16']:.2f} | "
          f"{diff:+.2f} |", flush=True)
  print("\n| bits | runs | float32 mean | bfloat16 mean | difference mean (min..max) |")
  print("| --- | --- | --- | --- | --- |")
  for label, values in per_bits.items():
    f32, bf16, diff = np.asarray(values).T
    print(f"| {label} | {len(values)} | {f32.mean():.2f} | {bf16.mean():.2f} | "
          f"{diff.mean():+.2f} ({diff.min():+.2f}..{diff.max():+.2f}) |")


if __name__ == "__main__":
  app.run(main)
