"""The README's examples for quantizing one's own Flax model run as written."""

import os
import re

from clamp_jax.models.quantized import quant_config
from clamp_jax.search import Budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(heading: str) -> dict:
  """Runs the first python block of README.md after `heading`; returns its namespace."""
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index(heading):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)
  return namespace


def test_own_flax_model_example_runs(capsys):
  namespace = run_example("## Quantizing your own Flax model")
  assert namespace["logits"].shape == (8, 10)
  assert set(namespace["qparams"]) == {"fc", "head"}
  assert float(namespace["qparams"]["fc"]["kernel"].bits) == 4
  assert "{'fc': '.*', 'head': '^head$'}" in capsys.readouterr().out
  history = namespace["history"]
  assert history[-1]["fitness_after"] <= history[0]["fitness_before"]  # searched: not worse


def test_foreign_vit_cycle_example_runs(capsys):
  namespace = run_example("**The generator, the data refresh and mixed precision.**")
  assert namespace["images"].shape == (16, 16, 16, 3)
  history, qparams = namespace["history"], namespace["qparams"]
  assert Budget.from_config(qparams, quant_config(budget=0.9)).allows(qparams)
  assert float(qparams["head"]["kernel"].bits) == 8 and "size_vs_w4a8" in history[-1]
  assert history[-1]["fitness_after"] <= history[-1]["fitness_before"]
  assert capsys.readouterr().out.strip()
