"""The README's example for quantizing one's own Flax model runs as written."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_own_flax_model_example_runs(capsys):
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index("## Quantizing your own Flax model"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)
  assert namespace["logits"].shape == (8, 10)
  assert set(namespace["qparams"]) == {"fc", "head"}
  assert float(namespace["qparams"]["fc"]["kernel"].bits) == 4
  assert "{'fc': '.*', 'head': '^head$'}" in capsys.readouterr().out
  history = namespace["history"]
  assert history[-1]["fitness_after"] <= history[0]["fitness_before"]  # searched: not worse
