"""launch.py end to end, in subprocesses as a user runs it."""

import os
import re

import numpy as np
import pytest

from conftest import ROOT, launch, launch_env, read_json

def test_train_then_eval_gives_the_same_accuracy(tmp_path):
  workdir = str(tmp_path / "train")
  launch("--config=configs/fmnist_vit.py:tiny", "--mode=train", f"--workdir={workdir}")
  trained = read_json(os.path.join(workdir, "train.json"))
  assert trained["top1"] > 30.0  # ten classes: chance is 10%
  assert os.path.exists(os.path.join(workdir, "params.npz"))
  assert os.path.isdir(os.path.join(workdir, "train_state"))  # orbax checkpoints

  # Fine-tuning starts from the given weights: with a zero learning rate they come out unchanged.
  tunedir = str(tmp_path / "tune")
  launch("--config=configs/fmnist_vit.py:tiny", "--mode=train", f"--workdir={tunedir}",
         f"--config.train.init_checkpoint={workdir}/params.npz", "--config.train.lr=0.0")
  with np.load(os.path.join(workdir, "params.npz")) as a, \
       np.load(os.path.join(tunedir, "params.npz")) as b:
    assert set(a.files) == set(b.files)
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  evaldir = str(tmp_path / "eval")
  out = launch("--config=configs/fmnist_vit.py:tiny", "--mode=eval", f"--workdir={evaldir}",
               f"--config.model.checkpoint={workdir}/params.npz")
  evaluated = read_json(os.path.join(evaldir, "eval.json"))
  assert evaluated["n"] == trained["n"] == 200
  assert evaluated["top1"] == pytest.approx(trained["top1"])
  assert f"float top-1: {evaluated['top1']:.2f}%" in out.stdout

  quantdir = str(tmp_path / "quant")
  launch("--config=configs/fmnist_vit.py:tiny,w4a8,minmax", f"--workdir={quantdir}",  # default mode
         f"--config.model.checkpoint={workdir}/params.npz", "--config.calib.source=gaussian")
  result = read_json(os.path.join(quantdir, "results.json"))
  assert result["fp_top1"] == pytest.approx(trained["top1"])
  assert (result["w_bits"], result["a_bits"], result["calib_source"]) == (4, 8, "gaussian")
  assert (result["w_bits_weighted"], result["a_bits_weighted"]) == (4, 8)
  assert 0 <= result["quant_top1"] <= 100 and result["seconds"] > 0
  assert os.path.exists(os.path.join(quantdir, "quantized.npz"))
  assert os.path.exists(os.path.join(quantdir, "quant_params", "sites.json"))

  searchdir = str(tmp_path / "search")
  launch("--config=configs/fmnist_vit.py:tiny,w4a4", f"--workdir={searchdir}",
         f"--config.model.checkpoint={workdir}/params.npz", "--config.calib.source=real")
  searched = read_json(os.path.join(searchdir, "results.json"))
  assert [h["block"] for h in searched["search_history"]] == [1, 0]
  assert all(h["fitness_after"] <= h["fitness_before"] for h in searched["search_history"])
  assert "minmax_top1" in searched and searched["seconds"] > 0

  gendir = str(tmp_path / "generate")
  launch("--config=configs/fmnist_vit.py:tiny,w4a4", "--mode=generate", f"--workdir={gendir}",
         f"--config.model.checkpoint={workdir}/params.npz", "--config.calib.source=clamp")
  report = read_json(os.path.join(gendir, "generate.json"))
  assert len(report["loss_curve"]) == 4 and 0 <= report["misprediction_rate"] <= 100
  with np.load(os.path.join(gendir, "generated.npz")) as f:
    assert f["images"].shape == (8, 28, 28, 1) and f["targets"].shape == (8,)
  assert os.path.getsize(os.path.join(gendir, "generated.png")) > 0

  psaqdir = str(tmp_path / "psaq")
  launch("--config=configs/fmnist_vit.py:tiny,w4a8,minmax", f"--workdir={psaqdir}",
         f"--config.model.checkpoint={workdir}/params.npz", "--config.calib.source=psaq")
  psaq = read_json(os.path.join(psaqdir, "results.json"))
  assert psaq["calib_source"] == "psaq" and "misprediction_rate" in psaq


@pytest.mark.parametrize("name,checkpoint", [("fmnist_vit", "fmnist_vit.npz"),
                                             ("fmnist_swin", "fmnist_swin.safetensors")])
def test_reference_checkpoint_reports_its_recorded_accuracy(tmp_path, name, checkpoint):
  assert os.path.exists(os.path.join(ROOT, "checkpoints", checkpoint))
  recorded = read_json(os.path.join(ROOT, "checkpoints", f"{name}.json"))
  launch(f"--config=configs/{name}.py", "--mode=eval", f"--workdir={tmp_path}",
         env=launch_env(optimize=True))  # 10,000 images: runtime matters
  result = read_json(os.path.join(tmp_path, "eval.json"))
  assert result["n"] == 10000
  assert result["top1"] == pytest.approx(recorded["top1"], abs=0.011)
  assert result["top1"] >= 88.0


def test_unknown_config_field_is_named(tmp_path):
  result = launch("--config=configs/fmnist_vit.py:tiny", "--mode=eval", f"--workdir={tmp_path}",
                  "--config.model.depth=3", check=False)
  assert result.returncode != 0 and "depth" in result.stderr


def test_unknown_config_argument_is_named(tmp_path):
  result = launch("--config=configs/fmnist_vit.py:huge", "--mode=eval", f"--workdir={tmp_path}",
                  check=False)
  assert result.returncode != 0 and "huge" in result.stderr


def test_missing_checkpoint_is_named(tmp_path):
  result = launch("--config=configs/fmnist_vit.py:tiny", "--mode=eval", f"--workdir={tmp_path}",
                  f"--config.model.checkpoint={tmp_path}/absent.npz", check=False)
  assert result.returncode != 0 and "absent.npz" in result.stderr


def test_missing_dataset_says_how_to_install(tmp_path):
  result = launch("--config=configs/fmnist_vit.py:tiny", "--mode=train", f"--workdir={tmp_path}",
                  f"--config.data.dir={tmp_path}/nowhere", check=False)
  assert result.returncode != 0 and "apt-get install dataset-fashion-mnist" in result.stderr


def test_mixed_precision_preset_reports_its_costs(tmp_path):
  from clamp_jax.models.checkpoints import save_vit_npz
  from conftest import random_params, tiny_model_config
  checkpoint = str(tmp_path / "tiny.npz")
  save_vit_npz(checkpoint, random_params(tiny_model_config(
      image_size=28, channels=1, patch_size=7, hidden_size=16, num_layers=2, num_heads=2,
      mlp_dim=32, num_classes=10)))
  launch("--config=configs/fmnist_vit.py:tiny,mp", f"--workdir={tmp_path}",
         f"--config.model.checkpoint={checkpoint}", "--config.calib.source=gaussian",
         "--config.quant.budget=0.9")
  result = read_json(os.path.join(tmp_path, "results.json"))
  assert result["size_vs_w4a8"] <= 0.9 and result["bops_vs_w4a8"] <= 1.0
  assert all(h["size_vs_w4a8"] <= 0.9 for h in result["search_history"])
  assert 2 <= result["w_bits_weighted"] < 4 and 4 <= result["a_bits"] <= 8


def test_distributed_config_initialises_jax_distributed_first(monkeypatch, tmp_path):
  """`config.distributed=True` calls `jax.distributed.initialize()` before anything else
  (here a stand-in that stops the run, so nothing is written)."""
  import importlib.util
  import jax

  class Initialised(Exception):
    pass

  def initialize(*args, **kwargs):
    raise Initialised(args, kwargs)

  monkeypatch.syspath_prepend(ROOT)
  monkeypatch.setattr(jax.distributed, "initialize", initialize)
  spec = importlib.util.spec_from_file_location("launch_under_test", os.path.join(ROOT, "launch.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  workdir = tmp_path / "run"
  module.FLAGS(["launch.py", f"--config={ROOT}/configs/fmnist_vit.py:tiny", f"--workdir={workdir}"])
  module.FLAGS.config.distributed = True
  with pytest.raises(Initialised):
    module.main(["launch.py"])
  assert not workdir.exists()
  module.FLAGS.unparse_flags()


def test_compilation_cache_serves_the_next_run(tmp_path):
  args = ("--config=configs/fmnist_vit.py:tiny,minmax", "--config.calib.source=gaussian",
          f"--config.compilation_cache={tmp_path}/xla")
  first = launch(*args, f"--workdir={tmp_path}/first")
  counts = lambda out: [int(n) for n in re.search(
      r"compilation cache \S+: (\d+) programs read from it .*, (\d+) compiled and written",
      out.stderr).groups()]
  read, written = counts(first)
  assert read == 0 and written > 0 and len(os.listdir(tmp_path / "xla")) > 0
  second = launch(*args, f"--workdir={tmp_path}/second")
  read, written = counts(second)
  assert read > 0 and written < read  # what the first compiled, the second reads
  results = [read_json(tmp_path / run / "results.json") for run in ("first", "second")]
  assert results[0]["quant_top1"] == results[1]["quant_top1"]


def test_compilation_cache_on_a_file_is_named(tmp_path):
  (tmp_path / "file").write_text("")
  result = launch("--config=configs/fmnist_vit.py:tiny", "--mode=eval", f"--workdir={tmp_path}",
                  f"--config.compilation_cache={tmp_path}/file", check=False)
  assert result.returncode == 2 and "config.compilation_cache" in result.stderr
