"""What a run leaves to read: metrics (JSON lines + TensorBoard events), a markdown report and plots."""

import json
import os
from typing import Dict, Optional

import numpy as np

from clamp_jax.files import atomic_path
from clamp_jax.quant.params import iter_sites

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.md"
BITS_PLOT_FILE = "bits.png"


class MetricsWriter:
  """Appends `{"step": s, name: value, ...}` lines to `workdir/metrics.jsonl` and the same scalars
  to TensorBoard event files in `workdir/tensorboard`.

  `resume_step`: lines of steps at or after it (written by a run killed before its checkpoint)
  are dropped, so a resumed run writes each step once.
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    from tensorboardX import SummaryWriter  # imported here: only runs that write metrics need it
    self.path = os.path.join(workdir, METRICS_FILE)
    kept = [line for line in read_metrics(workdir) if line["step"] < resume_step]
    with atomic_path(self.path) as tmp:
      with open(tmp, "w") as f:
        f.writelines(json.dumps(line, sort_keys=True) + "\n" for line in kept)
    self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, **values) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(step=step, **values), sort_keys=True) + "\n")
    for name, value in values.items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    self.tensorboard.close()


def read_metrics(workdir: str) -> list:
  """The lines of `workdir/metrics.jsonl` (none if it does not exist)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def markdown_table(results: Dict) -> str:
  """One-row markdown table of a run's `results.json`: top-1 and plain/weighted bits."""
  header = ("| model | FP top-1 | quantized top-1 | sites | W bits (weighted) | A bits (weighted) "
            "| calibration | search | seconds |")
  search = "yes" if results.get("search_history") else "no"
  row = (f"| {results.get('model', '')} | {results['fp_top1']:.2f} | {results['quant_top1']:.2f} "
         f"| {results.get('sites', '')} | {results['w_bits']:.2f} ({results['w_bits_weighted']:.2f}) "
         f"| {results['a_bits']:.2f} ({results['a_bits_weighted']:.2f}) "
         f"| {results['calib_source']} | {search} | {results['seconds']:.0f} |")
  return "\n".join([header, "| --- " * 9 + "|", row])


def plot_bits(path: str, qparams) -> None:
  """A PNG bar chart of each site's bit width (weights and activations), written atomically."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 1, figsize=(14, 7), constrained_layout=True)
  for ax, kind in zip(axes, ("weight", "activation")):
    sites = list(iter_sites(qparams, kind))
    names = [path_ for path_, _ in sites]
    bits = [float(np.mean(site.bits)) for _, site in sites]
    ax.bar(range(len(bits)), bits, color="tab:blue" if kind == "weight" else "tab:orange")
    ax.set_xticks(range(len(bits)), [n.replace("Transformer/encoderblock_", "b") for n in names],
                  rotation=90, fontsize=6)
    ax.set_ylabel(f"{kind} bits")
    ax.set_ylim(0, max(bits + [8]) + 0.5)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
  plt.close(fig)


def write_report(workdir: str, results: Dict, qparams, images_png: Optional[str] = None) -> str:
  """`workdir/report.md` (the table, the files beside it) and `workdir/bits.png`; returns the text."""
  plot_bits(os.path.join(workdir, BITS_PLOT_FILE), qparams)
  lines = ["# clamp_jax run report", "", markdown_table(results), "",
           f"- bit widths per site: `{BITS_PLOT_FILE}`"]
  if images_png:
    lines.append(f"- calibration images: `{os.path.basename(images_png)}`")
  lines += [f"- metrics per block: `{METRICS_FILE}`, TensorBoard: `tensorboard/`",
            "- quantized model (integer weights + scales): `quantized.npz`", ""]
  text = "\n".join(lines)
  with atomic_path(os.path.join(workdir, REPORT_FILE)) as tmp:
    with open(tmp, "w") as f:
      f.write(text)
  return text
