"""Shared fixtures: tiny models with every parameter random (so no layout mistake hides behind zeros).

XLA's backend optimisations are off for the test processes and the subprocesses they start (set
here, before JAX makes its backend): the tests' programs are small and nearly all compilation,
which this takes a third off. A test whose runtime matters compiles with `OPTIMIZED` or starts
launch.py with `launch_env(optimize=True)`.
"""

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile

ORIGINAL_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = f"{ORIGINAL_XLA_FLAGS} --xla_backend_optimization_level=0".strip()
OPTIMIZED = {"xla_backend_optimization_level": 3}  # jax.jit compiler_options: XLA's default

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models import build_model, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT = 600


@functools.lru_cache(maxsize=None)
def compilation_cache_dir() -> str:
  """One JAX compilation cache directory for this pytest process (each xdist worker has its own),
  removed at exit."""
  path = tempfile.mkdtemp(prefix="clamp_jax_test_jax_cache_")
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


@functools.lru_cache(maxsize=None)
def launch_env(optimize: bool = False):
  """The environment of launch.py subprocesses: the process's compilation cache, so a program one
  run compiled is read by the next; XLA's backend optimisations on only with `optimize` (a run over
  the reference model's 10,000 test images, where O0 doubles the runtime)."""
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache_dir(),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  if optimize:
    env["XLA_FLAGS"] = ORIGINAL_XLA_FLAGS
  return env


def launch(*args, env=None, check=True):
  """`python launch.py ARGS` in a subprocess from the repo root, as a user runs it (`env`:
  `launch_env()` unless given)."""
  result = subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=ROOT,
                          env=env or launch_env(), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
  if check and result.returncode != 0:
    raise AssertionError(f"launch.py {' '.join(args)} failed:\n{result.stderr[-3000:]}")
  return result


def read_json(path):
  with open(path) as f:
    return json.load(f)


def tiny_model_config(**overrides):
  fields = dict(image_size=32, channels=3, patch_size=8, hidden_size=32, num_layers=2,
                num_heads=4, mlp_dim=48, num_classes=5, pool="tok")
  fields.update(overrides)
  return model_config(**fields)


def random_params(model_cfg, seed: int = 0):
  """Params of `build_model(model_cfg)` with every leaf drawn from N(0, 0.3^2)."""
  model = build_model(model_cfg)
  shape = (1, model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros(shape))["params"]
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def random_images(model_cfg, n: int = 3, seed: int = 2):
  shape = (n, model_cfg.image_size, model_cfg.image_size, model_cfg.channels)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def calibrated_tiny(qcfg):
  """`(cfg, model, params, images, qparams)`: a random 2-block tiny ViT calibrated by `qcfg` on
  4 random images."""
  from clamp_jax.models.quantized import calibrate
  cfg = tiny_model_config(num_layers=2)
  model = build_model(cfg)
  params = random_params(cfg)
  images = jnp.asarray(random_images(cfg, n=4))
  return cfg, model, params, images, calibrate(model, params, images, qcfg)


@pytest.fixture(scope="session")
def env():
  """`launch_env()`, for tests that start launch.py with `subprocess` themselves."""
  return launch_env()


@pytest.fixture
def tiny_cfg():
  return tiny_model_config()
