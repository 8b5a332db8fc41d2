"""Clean errors: malformed checkpoints, a config that contradicts its checkpoint, user mistakes on
the command line (one line `error: ...`, exit status 2), the workdir lock, the quiet console."""

import logging as pylogging
import os
import subprocess
import sys

from absl import logging
import numpy as np
import pytest
from safetensors.numpy import save_file

import clamp_jax
from clamp_jax import cli
from clamp_jax.models.checkpoints.formats import POSEMB
from clamp_jax.models.checkpoints.loader import (CheckpointError, file_model_config,
                                                 load_checkpoint)
from clamp_jax.workdir_lock import LOCK_FILE, WorkdirBusyError, workdir_lock
from conftest import ROOT, launch, read_json, tiny_model_config

TINY = "--config=configs/fmnist_vit.py:tiny"


def shape_arrays(hidden=24, heads=3, layers=1, mlp=40, classes=10, patch=7, dtype=np.float32):
  """The arrays a vision_transformer file needs to tell its shape (zeros: no model is built)."""
  arrays = {"embedding/kernel": np.zeros((patch, patch, 1, hidden), dtype),
            "cls": np.zeros((1, 1, hidden), dtype), POSEMB: np.zeros((1, 17, hidden), dtype),
            "head/kernel": np.zeros((hidden, classes), dtype)}
  for i in range(layers):
    block = f"Transformer/encoderblock_{i}/"
    arrays[block + "MlpBlock_0/Dense_0/kernel"] = np.zeros((hidden, mlp), dtype)
    arrays[block + "MultiHeadDotProductAttention_0/query/kernel"] = np.zeros(
        (hidden, heads, hidden // heads), dtype)
  return arrays


def timm_shape_arrays(hidden=24, mlp=40, classes=10, patch=7):
  """The same for a timm state dict (PyTorch layouts)."""
  return {"patch_embed.proj.weight": np.zeros((hidden, 1, patch, patch), np.float32),
          "cls_token": np.zeros((1, 1, hidden), np.float32),
          "pos_embed": np.zeros((1, 17, hidden), np.float32),
          "head.weight": np.zeros((classes, hidden), np.float32),
          "blocks.0.mlp.fc1.weight": np.zeros((mlp, hidden), np.float32),
          "blocks.0.attn.qkv.weight": np.zeros((3 * hidden, hidden), np.float32)}


def write_truncated(path):
  np.savez(path, **shape_arrays())
  path.write_bytes(path.read_bytes()[:300])


def write_damaged(path):
  np.savez(path, **shape_arrays())
  data = bytearray(path.read_bytes())
  data[200:240] = b"x" * 40  # inside the first member: its CRC no longer matches
  path.write_bytes(bytes(data))


MALFORMED = {  # name: (file name, writer, what the message says after the path)
    "truncated_npz": ("x.npz", write_truncated,
                      "not a valid .npz file (truncated or not a zip archive)"),
    "not_a_zip": ("x.npz", lambda p: p.write_text("weights"),
                  "not a valid .npz file (truncated or not a zip archive)"),
    "damaged_member": ("x.npz", write_damaged, "is damaged (Bad CRC-32"),
    "not_safetensors": ("x.safetensors", lambda p: p.write_bytes(b"abc"),
                        "not a valid .safetensors file (Error while deserializing header"),
    "integer_npz": ("x.npz", lambda p: np.savez(p, **shape_arrays(dtype=np.int32)),
                    "has dtype int32; expected floating-point weights"),
    "integer_safetensors": ("x.safetensors", lambda p: save_file(
        {"head.weight": np.zeros((2, 3), np.int64)}, str(p)), "'head.weight' has dtype int64"),
    "object_array": ("x.npz", lambda p: np.savez(p, **{**shape_arrays(), "cls": np.array([{}])}),
                     "array 'cls' holds Python objects, not numbers"),
    "unknown_extension": ("x.pt", lambda p: p.write_bytes(b"\0"),
                          "unknown checkpoint extension '.pt'"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_checkpoint_is_one_line_naming_file_and_fault(tmp_path, name):
  filename, write, expected = MALFORMED[name]
  path = tmp_path / filename
  write(path)
  with pytest.raises(CheckpointError) as err:
    load_checkpoint(str(path), tiny_model_config())
  message = str(err.value)
  assert message.startswith(f"{path}: ") and "\n" not in message
  assert expected in message, message


def test_file_decides_its_shape_unless_a_pinned_field_contradicts_it(tmp_path):
  path = tmp_path / "vit.npz"
  np.savez(path, **shape_arrays(hidden=24, heads=3))
  guess = tiny_model_config(hidden_size=64, num_heads=4)
  cfg = file_model_config(str(path), guess)  # the config's values are a guess: the file wins
  assert (cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.mlp_dim) == (24, 3, 1, 40)
  assert file_model_config(str(path), guess, pinned={"image_size"}).num_heads == 3
  with pytest.raises(CheckpointError) as err:
    file_model_config(str(path), guess, pinned={"num_heads", "image_size"})
  assert str(err.value).startswith(f"{path}: config.model.num_heads=4 but the file holds 3")


def test_timm_file_means_exact_gelu(tmp_path):
  path = tmp_path / "deit.safetensors"
  save_file(timm_shape_arrays(), str(path))
  guess = tiny_model_config(num_heads=3, gelu_approximate=True)  # a ViT preset's guess
  assert file_model_config(str(path), guess).gelu_approximate is False
  with pytest.raises(CheckpointError, match="gelu_approximate=True but the file holds False"):
    file_model_config(str(path), guess, pinned={"gelu_approximate"})


def test_bad_config_field_is_one_line_and_status_2_before_any_work(tmp_path):
  workdir = tmp_path / "run"
  result = launch(TINY, "--mode=eval", f"--workdir={workdir}", "--config.model.num_head=3",
                  check=False)
  assert result.returncode == 2
  assert result.stderr.startswith("error: unknown config field config.model.num_head;")
  assert result.stderr.count("\n") == 1 and '"num_heads"' in result.stderr  # the suggestion
  assert not workdir.exists()


def test_override_that_contradicts_the_checkpoint_names_both_values(tmp_path):
  checkpoint = tmp_path / "vit.npz"
  np.savez(checkpoint, **shape_arrays(heads=3))
  workdir = tmp_path / "run"
  result = launch(TINY, "--mode=eval", f"--workdir={workdir}",
                  f"--config.model.checkpoint={checkpoint}", "--config.model.num_heads=4",
                  check=False)
  assert result.returncode == 2
  assert result.stderr == (f"error: {checkpoint}: config.model.num_heads=4 but the file holds 3 "
                           "(drop the override: the file decides)\n")
  assert not workdir.exists()


@pytest.fixture
def command_line(monkeypatch):
  """`parse(*args)`: the tiny config's command line parsed in-process, as `clamp-jax` does it
  (no `--config.` overrides: absl cannot define them twice in one process)."""
  def parse(*args):
    argv = ["clamp-jax", f"--config={ROOT}/configs/fmnist_vit.py:tiny", *args]
    monkeypatch.setattr(sys, "argv", argv)
    cli.parse_flags(argv)
    return cli.FLAGS.config
  yield parse
  cli.FLAGS.unparse_flags()


def test_config_json_records_the_shape_the_checkpoint_holds(tmp_path, command_line):
  checkpoint = tmp_path / "vit.npz"
  np.savez(checkpoint, **shape_arrays(hidden=24, heads=3, layers=1, mlp=40))
  config = command_line("--mode=eval", f"--workdir={tmp_path}")
  config.model.checkpoint = str(checkpoint)  # the tiny config says 16, 2 heads, 2 blocks, 32
  cli.prepare(config, "eval")
  cli.record_config(config, str(tmp_path), "eval")
  model = read_json(tmp_path / "config.json")["model"]
  assert (model["hidden_size"], model["num_heads"], model["num_layers"], model["mlp_dim"]) == \
      (24, 3, 1, 40)


HOLDER = """import sys
from clamp_jax.workdir_lock import workdir_lock
with workdir_lock(sys.argv[1]):
  print("held", flush=True)
  sys.stdin.read()
"""


def hold(workdir):
  """A process that holds `workdir`'s lock until its stdin closes."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "held\n"
  return proc


def release(proc):
  proc.stdin.close()
  assert proc.wait(timeout=60) == 0


def test_live_lock_blocks_a_second_run_and_goes_with_its_holder(tmp_path):
  proc = hold(tmp_path)
  try:
    with pytest.raises(WorkdirBusyError, match=f"in use by another run \\(pid {proc.pid} on "):
      with workdir_lock(str(tmp_path)):
        pass
  finally:
    release(proc)
  assert not (tmp_path / LOCK_FILE).exists()  # removed on exit
  with workdir_lock(str(tmp_path)) as path:
    assert open(path).read().split()[0] == str(os.getpid())


def test_lock_of_a_killed_run_does_not_block_a_resume(tmp_path):
  proc = hold(tmp_path)
  proc.kill()
  proc.wait(timeout=60)
  assert (tmp_path / LOCK_FILE).read_text().split()[0] == str(proc.pid)  # left behind
  with workdir_lock(str(tmp_path)) as path:
    assert open(path).read().split()[0] == str(os.getpid())
  assert not os.path.exists(path)


def test_run_on_a_held_workdir_stops_with_one_line_and_status_2(tmp_path, command_line, capsys):
  checkpoint = tmp_path / "vit.npz"
  np.savez(checkpoint, **shape_arrays())
  workdir = tmp_path / "run"
  workdir.mkdir()
  proc = hold(workdir)
  try:
    config = command_line("--mode=eval", f"--workdir={workdir}")
    config.model.checkpoint = str(checkpoint)
    with pytest.raises(SystemExit) as stopped:
      cli.main(["clamp-jax"])
    assert os.listdir(workdir) == [LOCK_FILE]  # nothing written
  finally:
    release(proc)
  assert stopped.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: {workdir} is in use by another run (pid {proc.pid} on ")
  assert err.count("\n") == 1


def log_record(path, level):
  return pylogging.LogRecord("absl", level, path, 1, "line", None, None)


def test_console_keeps_other_libraries_info_lines_for_verbosity_1():
  ours = os.path.join(os.path.dirname(clamp_jax.__file__), "search", "loop.py")
  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert cli.shown_on_console(log_record(ours, pylogging.INFO))
  assert cli.shown_on_console(log_record(orbax, pylogging.WARNING))
  assert not cli.shown_on_console(log_record(orbax, pylogging.INFO))
  verbosity = logging.get_verbosity()
  logging.set_verbosity(1)
  try:
    assert cli.shown_on_console(log_record(orbax, pylogging.INFO))
  finally:
    logging.set_verbosity(verbosity)
