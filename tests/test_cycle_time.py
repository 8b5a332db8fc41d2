"""bench/cycle_time.py --quick: the whole cycle on the tiny config at W4/A4 (so the rounding
reconstruction runs too), every part timed."""

import json
import os
import subprocess
import sys

from conftest import LAUNCH_TIMEOUT, ROOT

PARTS = ("generation", "calibration", "refresh", "search", "checkpoint", "reconstruction",
         "evaluation", "compile")


def test_quick_cycle_time(tmp_path):
  out = tmp_path / "rows.json"
  result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "cycle_time.py"),
                           "--quick", "--bits=w4a4", f"--json_out={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "| model | variant | P | K | N | generation |" in result.stdout
  [row] = json.loads(out.read_text())
  seconds = row["seconds"]
  for part in PARTS:  # every part ran (the quick schedule refreshes once per block)
    assert seconds[part] > 0, (part, seconds)
  assert sum(seconds[p] for p in (*PARTS, "other")) <= seconds["total"] * 1.001 + 1e-3
  assert row["candidates"] == 2 * (4 + 2 * 4 + 4)  # 2 blocks: start, 2 generations, 1 refresh
  assert row["candidates_per_s"] > 0
  assert row["peak_memory_bytes"] > 0
  assert 0 < row["evaluator_flops_per_s"] / row["matmul_flops_per_s"] < 1.5
