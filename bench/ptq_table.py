"""Runs `launch.py --mode=quantize` over bit presets and (calibration source, search) rows; prints
a markdown table.

  python bench/ptq_table.py --presets=w8a8,w6a6,w4a8,w4a4 --rows=real:no,gaussian:no
  python bench/ptq_table.py --presets=w8a8,w4a8,w4a4,mp \
      --rows=gaussian:no,real:no,psaq:no,clamp:no,clamp:yes

A row `SOURCE:yes` runs the block-wise search (with `clamp`/`psaq`, the full cycle: the images
are refreshed during the search); `SOURCE:no` is min-max calibration only. The `mp` preset
searches bits, so only its `:yes` rows run. Each row names the exact command that produced it;
results stay in --workdir/<row>/results.json.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("config", "configs/fmnist_vit.py", "config file")
flags.DEFINE_list("presets", ["w8a8", "w6a6", "w4a8", "w4a4"], "bit presets of the config")
flags.DEFINE_list("rows", ["real:no", "gaussian:no"], "SOURCE:SEARCH pairs, SEARCH yes or no")
flags.DEFINE_list("overrides", [], "extra --config.a.b=v flags for every run")
flags.DEFINE_string("workdir", "runs/bench", "parent of the runs' workdirs")
FLAGS = flags.FLAGS


def run(preset: str, source: str, search: bool) -> tuple:
  name = f"{preset}_{source}" + ("_search" if search else "")
  workdir = os.path.join(FLAGS.workdir, name)
  args = [f"--config={FLAGS.config}:{preset}", f"--workdir={workdir}",
          f"--config.calib.source={source}", f"--config.search.enabled={search}"]
  args += [f"--config.{o}" for o in FLAGS.overrides]
  command = "python launch.py " + " ".join(args)
  done = subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  if done.returncode:
    raise RuntimeError(f"{command} failed:\n{done.stderr[-3000:]}")
  with open(os.path.join(ROOT, workdir, "results.json")) as f:
    return json.load(f), command


def row(preset: str, source: str, search: bool, r: dict, command: str) -> str:
  generated = "misprediction_rate" in r
  mispredicted = f"{r['misprediction_rate']:.1f}%" if generated else "-"
  rate = f"{r['generate_steps_per_second']:.1f}" if generated else "-"
  return (f"| {preset.upper()} | {source} | {'yes' if search else 'no'} | {r['fp_top1']:.2f} "
          f"| {r['quant_top1']:.2f} | {r['w_bits']:.2f} ({r['w_bits_weighted']:.2f}) "
          f"| {r['a_bits']:.2f} ({r['a_bits_weighted']:.2f}) | {r['size_vs_w4a8']:.3f} "
          f"| {mispredicted} | {rate} | {r['seconds']:.0f} | `{command}` |")


def main(_):
  print("| bits | calibration | search | FP top-1 | quantized top-1 | W bits (weighted) "
        "| A bits (weighted) | size vs W4/A8 | FP mis-predicts targets | generation steps/s "
        "| seconds | command |")
  print("| --- " * 12 + "|")
  for preset in FLAGS.presets:
    for spec in FLAGS.rows:
      source, search = spec.split(":")
      if search not in ("yes", "no"):
        raise app.UsageError(f"--rows: {spec!r} must be SOURCE:yes or SOURCE:no")
      if preset == "mp" and search == "no":
        continue
      r, command = run(preset, source, search == "yes")
      print(row(preset, source, search == "yes", r, command), flush=True)


if __name__ == "__main__":
  app.run(main)
