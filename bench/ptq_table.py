"""Runs `launch.py --mode=quantize` over bit presets and calibration sources; prints a markdown table.

  python bench/ptq_table.py --presets=w8a8,w6a6,w4a8,w4a4 --sources=real,gaussian
  python bench/ptq_table.py --presets=w4a8,w4a4 --sources=real --search   # with and without search

Each row names the exact command that produced it; results stay in --workdir/<row>/results.json.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_string("config", "configs/fmnist_vit.py", "config file")
flags.DEFINE_list("presets", ["w8a8", "w6a6", "w4a8", "w4a4"], "bit presets of the config")
flags.DEFINE_list("sources", ["real", "gaussian"], "config.calib.source values")
flags.DEFINE_bool("search", False, "also run each row with config.search.enabled=True")
flags.DEFINE_list("overrides", [], "extra --config.a.b=v flags for every run")
flags.DEFINE_string("workdir", "runs/bench", "parent of the runs' workdirs")
FLAGS = flags.FLAGS


def run(preset: str, source: str, search: bool) -> tuple:
  name = f"{preset}_{source}" + ("_search" if search else "")
  workdir = os.path.join(FLAGS.workdir, name)
  args = [f"--config={FLAGS.config}:{preset}", f"--workdir={workdir}",
          f"--config.calib.source={source}"] + [f"--config.{o}" for o in FLAGS.overrides]
  if search:
    args.append("--config.search.enabled=True")
  command = "python launch.py " + " ".join(args)
  subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  with open(os.path.join(ROOT, workdir, "results.json")) as f:
    return json.load(f), command


def main(_):
  print("| bits | calibration | search | FP top-1 | quantized top-1 | W bits (weighted) "
        "| A bits (weighted) | FP mis-predicts targets | generation steps/s | seconds | command |")
  print("| --- " * 11 + "|")
  for preset in FLAGS.presets:
    for source in FLAGS.sources:
      for search in ([False, True] if FLAGS.search else [False]):
        r, command = run(preset, source, search)
        generated = "misprediction_rate" in r
        mispredicted = f"{r['misprediction_rate']:.1f}%" if generated else "-"
        rate = f"{r['generate_steps_per_second']:.1f}" if generated else "-"
        print(f"| {preset.upper()} | {source} | {'yes' if search else 'no'} | {r['fp_top1']:.2f} "
              f"| {r['quant_top1']:.2f} | {r['w_bits']:.2f} ({r['w_bits_weighted']:.2f}) "
              f"| {r['a_bits']:.2f} ({r['a_bits_weighted']:.2f}) | {mispredicted} | {rate} "
              f"| {r['seconds']:.0f} | `{command}` |", flush=True)


if __name__ == "__main__":
  app.run(main)
