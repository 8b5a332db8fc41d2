"""Packaging (pyproject.toml): what `pip install .` would install, without building it here.

Every package directory of clamp_jax is found by the pyproject's package discovery and nothing
else is; the declared version ranges hold the versions the suite runs on (and jax 0.11, the GPU
one); the console script's target exists. Where clamp_jax is installed (`pip install -r
requirements.txt` installs it), it imports, and `clamp-jax` runs, from any directory.
"""

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib

from packaging.requirements import Requirement
import pytest
import setuptools

from conftest import ROOT

with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
  PYPROJECT = tomllib.load(f)
PROJECT = PYPROJECT["project"]


def installed():
  try:
    return importlib.metadata.distribution("clamp_jax")
  except importlib.metadata.PackageNotFoundError:
    return None


def test_package_discovery_finds_every_package_directory_and_nothing_else():
  find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
  assert find.get("namespaces") is False  # only directories with __init__.py are packages
  found = set(setuptools.find_packages(ROOT, include=find["include"],
                                       exclude=find.get("exclude", ())))
  with_code = {os.path.relpath(folder, ROOT).replace(os.sep, ".")
               for folder, _, names in os.walk(os.path.join(ROOT, "clamp_jax"))
               if any(name.endswith(".py") for name in names)}
  assert "clamp_jax.models.checkpoints" in with_code
  assert found == with_code


def test_declared_ranges_hold_the_versions_in_use_and_jax_0_11():
  requirements = [Requirement(r) for r in PROJECT["dependencies"] +
                  PROJECT["optional-dependencies"]["test"]]
  for requirement in requirements:
    version = importlib.metadata.version(requirement.name)
    assert requirement.specifier.contains(version, prereleases=True), (requirement, version)
  jax = next(r for r in requirements if r.name == "jax")
  assert jax.specifier.contains("0.11.0") and not jax.extras  # plain jax: CPU by default
  for extra, jax_extra in (("cuda12", "cuda12"), ("tpu", "tpu")):
    accelerated = Requirement(PROJECT["optional-dependencies"][extra][0])
    assert accelerated.extras == {jax_extra} and accelerated.specifier == jax.specifier


def test_console_script_runs_the_main_of_launch_py():
  module, _, name = PROJECT["scripts"]["clamp-jax"].partition(":")
  script = getattr(importlib.import_module(module), name)
  spec = importlib.util.spec_from_file_location("launch_script", os.path.join(ROOT, "launch.py"))
  launch = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launch)
  assert launch.run is script and launch.main is sys.modules[module].main


@pytest.mark.skipif(installed() is None, reason="clamp_jax is not installed (pip install -e .)")
def test_installed_package_imports_and_runs_from_any_directory(tmp_path):
  scripts = [ep.value for ep in installed().entry_points if ep.name == "clamp-jax"]
  assert scripts == [PROJECT["scripts"]["clamp-jax"]]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  code = "import clamp_jax.models.checkpoints.loader as m; print(m.__name__)"
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.stdout == "clamp_jax.models.checkpoints.loader\n", result.stderr
  script = shutil.which("clamp-jax", path=os.path.dirname(sys.executable))
  if script:  # the configs stay in the checkout and are passed by path
    result = subprocess.run([script, f"--config={ROOT}/configs/fmnist_vit.py:tiny",
                             f"--workdir={tmp_path}/run", "--config.model.num_head=3"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.startswith("error: unknown config field config.model.num_head;")
