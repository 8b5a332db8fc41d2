"""Runs `launch.py --mode=quantize` over bit presets and (calibration source, search) rows; prints
a markdown table.

  python bench/ptq_table.py --presets=w8a8,w6a6,w4a8,w4a4 --rows=real:no,gaussian:no
  python bench/ptq_table.py --presets=w8a8,w4a8,w4a4,mp \
      --rows=gaussian:no,real:no,psaq:no,clamp:no,clamp:yes

A row `SOURCE:yes` runs the block-wise search (with `clamp`/`psaq`, the full cycle: the images
are refreshed during the search; then the rounding reconstruction where `config.reconstruct`
is on); `SOURCE:no` is min-max calibration only (the reconstruction off). The `mp` presets
(`mp`, or `mp+w4a4` for mixed precision under the uniform W4/A4 model) search bits, so only
their `:yes` rows run. With `--seeds=N` each row runs N times
(`--config.{calib,generate,search}.seed=S` for S in 0..N-1) and shows the mean and the range
(min..max). Each row names the exact command that produced it (seed 0's); results stay in
--workdir/<row>_s<S>/results.json.
"""

import json
import os
import subprocess
import sys

from absl import app, flags
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("config", "configs/fmnist_vit.py", "config file")
flags.DEFINE_list("presets", ["w8a8", "w6a6", "w4a8", "w4a4"], "bit presets of the config")
flags.DEFINE_list("rows", ["real:no", "gaussian:no"], "SOURCE:SEARCH pairs, SEARCH yes or no")
flags.DEFINE_list("overrides", [], "extra --config.a.b=v flags for every run")
flags.DEFINE_string("workdir", "runs/bench", "parent of the runs' workdirs")
flags.DEFINE_integer("seeds", 1, "runs per row (config.seed 0..seeds-1)")
FLAGS = flags.FLAGS


def run(preset: str, source: str, search: bool, seed: int) -> tuple:
  name = f"{preset}_{source}" + ("_search" if search else "") + f"_s{seed}"
  workdir = os.path.join(FLAGS.workdir, name)
  args = [f"--config={FLAGS.config}:{preset.replace('+', ',')}", f"--workdir={workdir}",
          f"--config.calib.source={source}", f"--config.search.enabled={search}",
          f"--config.calib.seed={seed}", f"--config.generate.seed={seed}",
          f"--config.search.seed={seed}"]
  if not search:  # min-max only: no rounding reconstruction either
    args.append("--config.reconstruct.enabled=False")
  args += [f"--config.{o}" for o in FLAGS.overrides]
  command = "python launch.py " + " ".join(args)
  done = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  if done.returncode:
    raise RuntimeError(f"{command} failed:\n{done.stderr[-3000:]}")
  with open(os.path.join(ROOT, workdir, "results.json")) as f:
    return json.load(f), command


def spread(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.2f}" if len(v) == 1 else f"{v.mean():.2f} ({v.min():.2f}..{v.max():.2f})"


def row(preset: str, source: str, search: bool, runs: list, command: str) -> str:
  r = runs[0]
  generated = "misprediction_rate" in r
  mispredicted = spread([x["misprediction_rate"] for x in runs]) + "%" if generated else "-"
  rate = f"{r['generate_steps_per_second']:.1f}" if generated else "-"
  start = spread([x["minmax_top1"] for x in runs]) if "minmax_top1" in r else "-"
  return (f"| {preset.upper()} | {r.get('sites', '')} | {source} | {'yes' if search else 'no'} "
          f"| {r['fp_top1']:.2f} | {spread([x['quant_top1'] for x in runs])} | {start} "
          f"| {r['w_bits']:.2f} ({r['w_bits_weighted']:.2f}) "
          f"| {r['a_bits']:.2f} ({r['a_bits_weighted']:.2f}) | {r['size_vs_w4a8']:.3f} "
          f"| {r['bops_vs_w4a8']:.3f} | {mispredicted} | {rate} "
          f"| {spread([x['seconds'] for x in runs])} | `{command}` |")


def main(_):
  print("| bits | sites | calibration | search | FP top-1 | quantized top-1 | start (min-max) top-1 "
        "| W bits (weighted) | A bits (weighted) | size vs W4/A8 | BOPs vs W4/A8 "
        "| FP mis-predicts targets | generation steps/s | seconds | command |")
  print("| --- " * 15 + "|")
  for preset in FLAGS.presets:
    for spec in FLAGS.rows:
      source, search = spec.split(":")
      if search not in ("yes", "no"):
        raise app.UsageError(f"--rows: {spec!r} must be SOURCE:yes or SOURCE:no")
      if preset.startswith("mp") and search == "no":
        continue
      runs = [run(preset, source, search == "yes", seed) for seed in range(FLAGS.seeds)]
      print(row(preset, source, search == "yes", [r for r, _ in runs], runs[0][1]), flush=True)


if __name__ == "__main__":
  app.run(main)
