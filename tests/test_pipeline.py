"""The CLAMP cycle of `launch.py --mode=quantize` end to end, in subprocesses: kill and resume,
validation at start, export -> eval, and the files a run leaves.

Every subprocess shares one JAX persistent compilation cache (the first run compiles, the
others read the same executables), which keeps the file to a few minutes on 2 CPU cores.
"""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clamp_jax.models.checkpoints import save_vit_npz
from clamp_jax.qwix_export import weight_bytes
from clamp_jax.report import read_metrics
from conftest import LAUNCH_TIMEOUT as TIMEOUT, ROOT, launch, random_params, read_json, tiny_model_config

LAUNCH = [sys.executable, os.path.join(ROOT, "launch.py")]
NUM_EVAL = 100
NUM_BLOCKS = 6  # 3 passes over 2 blocks
KILL_AFTER = 2  # blocks checkpointed before the SIGKILL


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A random float checkpoint of the shape of `configs/fmnist_vit.py:tiny`."""
  path = str(tmp_path_factory.mktemp("checkpoint") / "tiny.npz")
  save_vit_npz(path, random_params(tiny_model_config(
      image_size=28, channels=1, patch_size=7, hidden_size=16, num_layers=2, num_heads=2,
      mlp_dim=32, num_classes=10)))
  return path


def search_args(checkpoint, workdir):
  """The CLAMP cycle on the tiny model: generated images refreshed every generation, 3 passes,
  then the rounding reconstruction with learned activation steps."""
  return ["--config=configs/fmnist_vit.py:tiny,w4a4", f"--workdir={workdir}",
          f"--config.model.checkpoint={checkpoint}", f"--config.eval.num_images={NUM_EVAL}",
          "--config.calib.source=clamp", "--config.search.enabled=True",
          "--config.search.passes=3", "--config.search.generations=2",
          "--config.search.refresh_every=1", "--config.reconstruct.enabled=True",
          "--config.reconstruct.steps=10", "--config.reconstruct.act_scale_lr=1e-2"]


def complete_steps(workdir):
  """The orbax steps of `workdir/state` that are finalized (a folder named by the step alone;
  orbax writes `STEP.orbax-checkpoint-tmp*` and renames it when complete)."""
  state = os.path.join(workdir, "state")
  if not os.path.isdir(state):
    return []
  return sorted(int(name) for name in os.listdir(state) if re.fullmatch(r"\d+", name))


def snapshot(workdir):
  """`{relative path: (size, mtime_ns)}` of every file under `workdir`."""
  out = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(folder, name)
      stat = os.stat(path)
      out[os.path.relpath(path, workdir)] = (stat.st_size, stat.st_mtime_ns)
  return out


def quant_arrays(workdir):
  """`(arrays, static)` of the QuantParams a run saved in `workdir/quant_params`."""
  from clamp_jax.quant import params as qparams_lib
  return qparams_lib.split(qparams_lib.restore(os.path.join(workdir, "quant_params")))


def assert_same_quant_params(a_dir, b_dir):
  (a_arrays, a_static), (b_arrays, b_static) = quant_arrays(a_dir), quant_arrays(b_dir)
  assert a_static == b_static  # the same sites, with the same kinds, signs and sizes
  assert set(a_arrays) == set(b_arrays) and a_arrays
  for site in a_arrays:
    assert set(a_arrays[site]) == set(b_arrays[site]), site
    for field in a_arrays[site]:
      np.testing.assert_array_equal(a_arrays[site][field], b_arrays[site][field],
                                    err_msg=f"{site}.{field}")


def assert_same_npz(a_path, b_path):
  with np.load(a_path) as a, np.load(b_path) as b:
    assert set(a.files) == set(b.files) and a.files
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def kill_after_blocks(args, workdir, env, log_path, blocks):
  """Runs launch.py with `args` and SIGKILLs it once `blocks` block checkpoints are complete."""
  with open(log_path, "w") as log:
    proc = subprocess.Popen(LAUNCH + args, cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + TIMEOUT
      while not [s for s in complete_steps(workdir) if s >= blocks]:
        assert proc.poll() is None, f"run ended before it was killed: {proc.returncode}"
        assert time.time() < deadline, f"no checkpoint of {blocks} blocks in time"
        time.sleep(0.02)
      os.kill(proc.pid, signal.SIGKILL)
      assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def final_state(workdir):
  from clamp_jax.run_state import RunCheckpoints
  checkpoints = RunCheckpoints(os.path.join(workdir, "state"))
  try:
    return checkpoints.latest()
  finally:
    checkpoints.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint, env):
  """The workdir of the tiny CLAMP cycle run once, never stopped."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = launch(*search_args(checkpoint, workdir), env=env)
  with open(workdir + ".console.txt", "w") as f:  # beside the workdir, not in it
    f.write(result.stderr + result.stdout)
  return workdir


def test_console_is_a_line_per_phase_and_a_few_per_block(reference):
  """What a person follows: each phase once, per block its search line and its refreshes' lines
  (no per-step refresh lines), no other library's INFO lines."""
  lines = open(reference + ".console.txt").read().splitlines()
  for phase in ("loaded ", "generating ", "calibrated ", "min-max start: top-1",
                "evaluated on ", "W4/A"):
    assert sum(phase in line for line in lines) == 1, phase
  assert sum("fitness" in line and "ETA" in line for line in lines) == NUM_BLOCKS
  assert sum("refreshed " in line for line in lines) == NUM_BLOCKS  # between its 2 generations
  assert sum("the reconstruction's 4 more clamp images" in line for line in lines) == 1
  # generation steps (4, and 4 of the extra images), the phase lines, the reconstruction's 3 units
  per_run = 4 + 4 + 6 + 1 + 3
  assert len(lines) <= per_run + 3 * NUM_BLOCKS, "\n".join(lines)
  assert not any("orbax" in line or "checkpoint_manager" in line for line in lines)


def test_killed_run_resumes_to_the_same_result(tmp_path, checkpoint, env, reference):
  """SIGKILL after two block checkpoints; the same command resumes and ends bit for bit as the
  run never stopped; the finished workdir is then not redone."""
  workdir = str(tmp_path / "killed")
  args = search_args(checkpoint, workdir)
  kill_after_blocks(args, workdir, env, tmp_path / "killed.log", KILL_AFTER)
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  steps = complete_steps(workdir)
  assert KILL_AFTER <= max(steps) < NUM_BLOCKS  # killed in the middle of the search
  assert all(line["step"] <= max(steps) for line in read_metrics(workdir))

  resumed = launch(*args, env=env)
  assert f"resuming {workdir} after {max(steps)} blocks" in resumed.stderr
  assert_same_quant_params(workdir, reference)
  assert_same_npz(os.path.join(workdir, "quantized.npz"),
                  os.path.join(reference, "quantized.npz"))
  state, reference_state = final_state(workdir), final_state(reference)
  assert state.position == reference_state.position == NUM_BLOCKS
  np.testing.assert_array_equal(state.images, reference_state.images)  # the last refresh

  results, expected = (read_json(os.path.join(d, "results.json")) for d in (workdir, reference))
  for key in ("fp_top1", "quant_top1", "w_bits", "a_bits", "w_bits_weighted", "a_bits_weighted",
              "size_vs_w4a8", "minmax_top1", "misprediction_rate", "reconstruct",
              "before_reconstruct_top1"):
    assert results[key] == expected[key], key
  fitness = lambda r: [(h["pass_"], h["block"], h["fitness_before"], h["fitness_after"])
                       for h in r["search_history"]]
  assert fitness(results) == fitness(expected) and len(fitness(results)) == NUM_BLOCKS
  assert [line["step"] for line in read_metrics(workdir)] == list(range(NUM_BLOCKS))

  # A finished workdir is returned as it is: nothing recomputed, nothing rewritten.
  before, metrics_before = snapshot(workdir), read_metrics(workdir)
  again = launch(*args, env=env)
  assert "is finished" in again.stderr and "resuming" not in again.stderr
  after = snapshot(workdir)
  del before["config.json"], after["config.json"]  # rewritten with the same content
  assert after == before
  assert read_metrics(workdir) == metrics_before
  assert read_json(os.path.join(workdir, "results.json")) == results


# Kills the run at a named point: a function of the pipeline replaced by one that SIGKILLs the
# process on its Nth call (the point's work half done: nothing after it saved), then launch.py.
FAULT_DRIVER = """
import os, runpy, signal, sys
import importlib
module, name, call = sys.argv[1], sys.argv[2], int(sys.argv[3])
target = importlib.import_module(module)
original, calls = getattr(target, name), []
def fault(*args, **kwargs):
  calls.append(1)
  if len(calls) == call:
    original(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
  return original(*args, **kwargs)
setattr(target, name, fault)
sys.argv = [os.path.join(sys.argv[4], "launch.py")] + sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

KILL_POINTS = {  # name -> (module, function, call killed in); between block checkpoints: above
    "first_generation": ("clamp_jax.pipeline", "generate_images", 1),
    "final_export": ("clamp_jax.pipeline", "export_integer", 1),
}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_run_killed_at_each_point_resumes_to_the_same_result(tmp_path, checkpoint, env,
                                                             reference, point):
  """SIGKILL in the first generation (images made, nothing checkpointed) and in the final export
  (after the reconstruction and the evaluation, nothing written): the same command then ends
  with the never-stopped run's QuantParams, export and top-1."""
  workdir = str(tmp_path / point)
  args = search_args(checkpoint, workdir)
  killed = subprocess.run([sys.executable, "-c", FAULT_DRIVER, *map(str, KILL_POINTS[point]),
                           ROOT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  launch(*args, env=env)
  assert_same_quant_params(workdir, reference)
  assert_same_npz(os.path.join(workdir, "quantized.npz"),
                  os.path.join(reference, "quantized.npz"))
  results, expected = (read_json(os.path.join(d, "results.json")) for d in (workdir, reference))
  for key in ("quant_top1", "minmax_top1", "before_reconstruct_top1", "reconstruct"):
    assert results[key] == expected[key], key


def test_finished_run_writes_results_and_report(tmp_path, reference, checkpoint, env):
  """results.json, report.md, plots, metrics, TensorBoard events, QuantParams, the export."""
  results = read_json(os.path.join(reference, "results.json"))
  for key in ("fp_top1", "quant_top1", "w_bits", "a_bits", "w_bits_weighted", "a_bits_weighted",
              "size_vs_w4a8", "seconds", "misprediction_rate"):
    assert isinstance(results[key], (int, float)), key
  assert (results["w_bits"], results["calib_source"], results["n"]) == (4, "clamp", NUM_EVAL)
  assert (results["sites"], results["reparam"]) == ("matmul", True)  # the protocol is named
  assert 4 <= results["a_bits"] <= 8 and results["seconds"] > 0
  assert 0 <= results["quant_top1"] <= 100 and 0 <= results["misprediction_rate"] <= 100
  assert [(h["pass_"], h["block"]) for h in results["search_history"]] == \
      [(p, b) for p in range(3) for b in (1, 0)]
  assert [h["block"] for h in results["reconstruct"]] == ["embedding", 0, 1]  # first to last
  assert all(h["before"] > 0 and h["after"] > 0 and h["drift"] > 0
             for h in results["reconstruct"])
  assert 0 <= results["before_reconstruct_top1"] <= 100
  assert (results["calib_images"], results["reconstruct_images"]) == (8, 12)  # 4 extra (tiny)
  # The saved QuantParams hold the reconstruction's activation steps, not the search's.
  from clamp_jax.quant import params as qparams_lib
  from clamp_jax.run_state import RunCheckpoints
  searched = RunCheckpoints(os.path.join(reference, "state"))
  searched_arrays = qparams_lib.split(searched.latest().qparams)[0]
  searched.close()
  saved = quant_arrays(reference)[0]
  moved = [path for path in saved
           if not np.array_equal(saved[path]["scale"], searched_arrays[path]["scale"])]
  assert moved and all("/encoderblock_" in path for path in moved)
  launch("--config=configs/fmnist_vit.py:tiny", "--mode=eval", f"--workdir={tmp_path}",
         f"--config.model.checkpoint={checkpoint}", f"--config.eval.num_images={NUM_EVAL}",
         env=env)
  # fp_top1 is the float checkpoint's, not that of the rounded weights without their quantizers
  assert read_json(os.path.join(tmp_path, "eval.json"))["top1"] == results["fp_top1"]

  with open(os.path.join(reference, "report.md")) as f:
    report = f.read()
  assert "| quantized top-1 | sites |" in report
  assert f"| {results['fp_top1']:.2f} | {results['quant_top1']:.2f} | matmul |" in report
  for name in ("bits.png", "generated.png"):
    with open(os.path.join(reference, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name

  metrics = read_metrics(reference)
  assert [line["step"] for line in metrics] == list(range(NUM_BLOCKS))
  assert all("fitness_after" in line for line in metrics)
  events = os.listdir(os.path.join(reference, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert os.path.isfile(os.path.join(reference, "quant_params", "sites.json"))
  with np.load(os.path.join(reference, "quantized.npz")) as f:
    assert f.files
    assert results["weight_bytes"] == weight_bytes(f)  # float32, and the qwix export's
  assert 0 < results["weight_bytes"]["quantized"] < results["weight_bytes"]["float"]


def test_exported_model_evaluates_to_the_run_top1(tmp_path, checkpoint, env, reference):
  """`--mode=eval` of the run's quantized.npz gives the top-1 the run reported."""
  out = launch("--config=configs/fmnist_vit.py:tiny,w4a4", "--mode=eval",
               f"--workdir={tmp_path}", f"--config.model.checkpoint={checkpoint}",
               f"--config.model.quantized={reference}/quantized.npz",
               f"--config.eval.num_images={NUM_EVAL}", env=env)
  evaluated = read_json(os.path.join(tmp_path, "eval.json"))
  results = read_json(os.path.join(reference, "results.json"))
  assert evaluated["n"] == results["n"] == NUM_EVAL
  assert evaluated["top1"] == results["quant_top1"]
  assert f"quantized top-1: {evaluated['top1']:.2f}%" in out.stdout


INVALID = {  # name: (config arguments, what the error names)
    "unknown_field": ([":tiny", "--config.search.populaton=3"], ["populaton"]),
    "zero_bits": ([":tiny", "--config.quant.w_bits=0"], ["config.quant.w_bits"]),
    "zero_population": ([":tiny", "--config.search.population=0"],
                        ["config.search.population"]),
    "budget_out_of_reach": ([":tiny,mp", "--config.quant.budget=0.1"], ["config.quant.budget"]),
    "missing_checkpoint": ([":tiny", "--config.model.checkpoint={tmp}/absent.npz"],
                           ["config.model.checkpoint", "absent.npz"]),
    "missing_dataset": ([":tiny", "--config.data.dir=/nonexistent"],
                        ["apt-get install dataset-fashion-mnist"]),
    "unknown_calib_source": ([":tiny", "--config.calib.source=imagenet"],
                             ["config.calib.source", "imagenet"]),
}


@pytest.fixture(scope="module")
def invalid_runs(tmp_path_factory, checkpoint, env):
  """`{name: (workdir, CompletedProcess-like)}` of every INVALID run, started all at once."""
  procs = {}
  for name, (args, _) in INVALID.items():
    workdir = tmp_path_factory.mktemp(name)
    arg, *overrides = args
    cmd = LAUNCH + [f"--config=configs/fmnist_vit.py{arg}", f"--workdir={workdir}",
                    f"--config.model.checkpoint={checkpoint}"]
    cmd += [o.format(tmp=workdir) for o in overrides]
    t0 = time.time()
    procs[name] = (str(workdir), t0, subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = {}
  for name, (workdir, t0, proc) in procs.items():
    stdout, stderr = proc.communicate(timeout=TIMEOUT)
    results[name] = (workdir, proc.returncode, stdout, stderr, time.time() - t0)
  return results


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_config_stops_at_start_naming_it(name, invalid_runs):
  """Each invalid config stops before any work with one line naming the field (or what to
  install), no traceback."""
  workdir, returncode, _, stderr, _ = invalid_runs[name]
  assert returncode == 2 and stderr.splitlines()[-1].startswith("error: ")
  assert "Traceback" not in stderr
  for expected in INVALID[name][1]:
    assert expected in stderr, f"{expected!r} not in:\n{stderr[-2000:]}"
  assert set(os.listdir(workdir)) <= {"config.json"}


def test_rerun_with_another_config_names_the_difference(checkpoint, env, reference):
  """A quantize workdir refuses a run of another config and is left as it was."""
  before = snapshot(reference)
  args = search_args(checkpoint, reference)
  args[args.index("--config.search.passes=3")] = "--config.search.passes=2"
  result = launch(*args, env=env, check=False)
  assert result.returncode != 0
  assert "search.passes" in result.stderr and "another config" in result.stderr
  assert snapshot(reference) == before
