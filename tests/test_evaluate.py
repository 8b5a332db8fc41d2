"""`evaluate_params`: top-1 over padded batches, and its progress lines on a long evaluation."""

import numpy as np

from clamp_jax import data as data_lib
from clamp_jax import evaluate
from clamp_jax.models import build_model
from configs import fmnist_vit
from conftest import random_params


def logged_lines(monkeypatch):
  """The messages `evaluate` logs from now on (whatever the logging set-up of earlier tests)."""
  lines = []
  monkeypatch.setattr(evaluate.logging, "info", lambda msg, *args: lines.append(msg % args))
  return lines


def test_long_evaluation_logs_its_progress_and_counts_every_image(monkeypatch):
  config = fmnist_vit.get_config("tiny")
  config.eval.update(batch_size=64, num_images=150)  # 64 + 64 + 22 (padded)
  model, params = build_model(config.model), random_params(config.model)
  monkeypatch.setattr(evaluate, "PROGRESS_SECONDS", 0.0)  # a line after every batch
  lines = logged_lines(monkeypatch)
  result = evaluate.evaluate_params(config, model, params)
  assert [line.split(" images")[0] for line in lines] == \
      ["evaluating: 64", "evaluating: 128", "evaluating: 150"]
  images, labels = map(np.concatenate, zip(*data_lib.batches(
      config.data, "test", 150, config.model.image_size, 150)))
  expected = np.argmax(model.apply({"params": params}, images), -1) == labels
  assert result["n"] == 150 and abs(result["top1"] - 100.0 * expected.mean()) < 1e-9
  assert lines[-1].split("top-1 ")[1].split("%")[0] == f"{result['top1']:.2f}"


def test_short_evaluation_prints_no_progress(monkeypatch):
  config = fmnist_vit.get_config("tiny")
  config.eval.update(batch_size=64, num_images=64)
  model, params = build_model(config.model), random_params(config.model)
  lines = logged_lines(monkeypatch)
  evaluate.evaluate_params(config, model, params)
  assert lines == []
