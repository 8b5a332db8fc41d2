"""What more activation bits would buy a finished run: its quantized export evaluated with each
activation site kind of every block (and the head's input) raised to more bits, the grid's
range kept (`search.mixed.with_bits`), the weights as exported (issue 9).

  python bench/activation_headroom.py --workdirs=runs/a,... [--split='train[-10000:]'] [--bits=8,5]

An upper bound on what mixed precision can buy with activation bits at the same weights; the
weights' rounding was fitted to the run's activation grids, so a raise can also cost. Choose on
held-in training images (`--split`), never on the test split. Prints one markdown table per
workdir: top-1 and the change against the export as it is.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clamp_jax.evaluate import evaluate_params  # noqa: E402
from clamp_jax.models import build_model  # noqa: E402
from clamp_jax.quant.params import replace_sites  # noqa: E402
from clamp_jax.search.mixed import with_bits  # noqa: E402
from finished_run import load_export, run_config  # noqa: E402

flags.DEFINE_list("workdirs", [], "finished runs (config.json, quantized.npz)")
flags.DEFINE_string("split", "train[-10000:]", "where top-1 is measured (held-in images)")
flags.DEFINE_list("bits", ["8", "5"], "the raised bit widths")
flags.DEFINE_list("kinds", ["ln1", "q", "k", "v", "attn_v", "ln2", "gelu", "head_in"],
                  "activation site names (the last part of the path)")
FLAGS = flags.FLAGS


def raised(qparams: dict, kinds, bits: int) -> dict:
  """`qparams` with the uniform sites named in `kinds` at `bits`."""
  return replace_sites(qparams, lambda path, site: with_bits(site, bits)
                       if site.uniform and path.rsplit("/", 1)[-1] in kinds else site)


def main(_):
  for workdir in FLAGS.workdirs:
    config = run_config(workdir)
    config.eval.update(split=FLAGS.split, num_images=0)
    model_cfg, params, qparams = load_export(workdir, config)
    model = build_model(model_cfg)
    top1 = lambda q: evaluate_params(config, model, params, {"quant": q})["top1"]
    base = top1(qparams)
    print(f"\n{workdir} on {FLAGS.split}: {base:.2f} as exported\n")
    print("| raised | " + " | ".join(f"{b} bits" for b in FLAGS.bits) + " |")
    print("| --- |" + " --- |" * len(FLAGS.bits))
    for kinds in [[kind] for kind in FLAGS.kinds] + [FLAGS.kinds]:
      cells = [top1(raised(qparams, kinds, int(b))) for b in FLAGS.bits]
      name = kinds[0] if len(kinds) == 1 else "all of them"
      print(f"| {name} | " + " | ".join(f"{c:.2f} ({c - base:+.2f})" for c in cells) + " |",
            flush=True)


if __name__ == "__main__":
  app.run(main)
