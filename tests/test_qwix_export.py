"""Serving an export through qwix (`clamp_jax/qwix_export.py`): qwix PTQ params holding real int8 /
int4 kernels with our scales and zero points give our logits; with `activations=True`, so do the
activation grids qwix can express, and every other site is named with its reason."""

import os
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

qwix = pytest.importorskip("qwix")
# qwix 0.1.8 on flax 0.12 warns about nnx.VariableState on every intercepted call.
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")

from conftest import ROOT, calibrated_tiny
from clamp_jax.models import build_model
from clamp_jax.models.checkpoints import load_checkpoint
from clamp_jax.models.quantized import calibrate, dequantized_params, export_integer, quant_config
from clamp_jax.quant.params import ACTIVATION, WEIGHT, flatten, unflatten
from clamp_jax.qwix_export import to_qwix, weight_bytes
from configs.fmnist_vit import get_config

ATTENTION = {"q", "k", "v", "attn_probs"}


def serve(model, export, images):
  return qwix.quantize_model(model, qwix.PtqProvider(export.rules)).apply(
      {"params": export.params}, images)


def only(qparams, keep):
  """The sites of `qparams` for which `keep(path, site)` holds."""
  return unflatten({path: site for path, site in flatten(qparams).items() if keep(path, site)})


def tree_bytes(tree) -> int:
  """Bytes of a tree's arrays, int4 packed (two values a byte)."""
  bits = lambda d: (jnp.iinfo if jnp.issubdtype(d, jnp.integer) else jnp.finfo)(d).bits
  return sum(-(-x.size * bits(x.dtype) // 8) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("w_bits,w_symmetric,storage", [
    (8, False, jnp.int8), (4, False, jnp.int4), (3, True, jnp.int4)])
def test_weights_served_as_integer_qarrays_give_our_logits(w_bits, w_symmetric, storage):
  _, model, params, images, qparams = calibrated_tiny(
      quant_config(w_bits=w_bits, w_symmetric=w_symmetric))
  arrays = export_integer(params, qparams)
  export = to_qwix(arrays, model, images)
  flat = flax.traverse_util.flatten_dict(export.params, sep="/")
  ours = flax.traverse_util.flatten_dict(dequantized_params(arrays), sep="/")
  kernels = {key: leaf.array for key, leaf in flat.items() if hasattr(leaf, "array")}
  assert set(kernels) == set(flatten(only(qparams, lambda _, site: site.kind == WEIGHT)))
  for key, q in kernels.items():
    assert isinstance(q, qwix.QArray) and q.qvalue.dtype == storage
    np.testing.assert_array_equal(np.asarray(q.qvalue.astype(jnp.int8)), arrays[f"{key}.int"])
    assert (q.zero_point is None) == w_symmetric
    np.testing.assert_array_equal(qwix.dequantize(q), ours[key])  # bit for bit
  weights_only = only(qparams, lambda _, site: site.kind == WEIGHT)
  expected = model.apply({"params": params, "quant": weights_only}, images)
  logits = serve(model, export, images)
  np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)  # float32 summation order
  assert np.abs(logits - model.apply({"params": params}, images)).max() > 1e-3  # not float
  activations = {p for p, s in flatten(qparams).items() if s.kind == ACTIVATION}
  assert export.float_sites == {site: "activations=False" for site in activations}
  memory = weight_bytes(arrays)
  assert memory == {"float": tree_bytes(params), "quantized": tree_bytes(export.params)}
  assert memory["quantized"] < memory["float"] * (0.35 if w_bits == 8 else 0.25)


# (config.quant overrides, {site name: why it stays float}) beside the attention's sites.
CASES = [
    (dict(w_symmetric=True), {}),  # asymmetric int8 activations into symmetric kernels
    (dict(a_symmetric=True, a_bits=6), {}),  # symmetric "int6" into asymmetric kernels
    (dict(), {name: "one asymmetric operand per matmul"
              for name in ("image", "ln1", "attn_v", "ln2", "gelu", "head_in")}),
    (dict(w_bits=4, a_bits=4, w_symmetric=True),  # the image stays 8-bit: int8 x int4 is served
     {name: "int4 x int4" for name in ("ln1", "attn_v", "ln2", "gelu", "head_in")}),
    (dict(w_symmetric=True, gelu="twin", a_bits=6),
     {"gelu": "twin grid", **{name: "asymmetric grids are int4 and int8"
                              for name in ("ln1", "attn_v", "ln2", "head_in")}}),
    (dict(w_symmetric=True, sites="all"),
     {name: "no kernel's direct matmul input" for name in (
         "patch_embed", "posembed", "attn_logits", "attn_out", "residual1", "fc2", "residual2",
         "encoder_norm_out", "logits")}),
]


@pytest.mark.parametrize("overrides,float_reasons", CASES)
def test_activation_grids_qwix_expresses_give_our_logits(overrides, float_reasons):
  _, model, params, images, qparams = calibrated_tiny(quant_config(**overrides))
  export = to_qwix(export_integer(params, qparams), model, images, activations=True)
  reasons = {}
  for site, reason in export.float_sites.items():
    name = site.rsplit("/", 1)[-1]
    expected = "activation x activation" if name in ATTENTION else float_reasons[name]
    assert expected in reason, (site, reason)
    reasons[name] = reason
  assert set(reasons) == ATTENTION | set(float_reasons)
  served = only(qparams, lambda path, _: path not in export.float_sites)
  expected = model.apply({"params": params, "quant": served}, images)
  np.testing.assert_allclose(serve(model, export, images), expected, rtol=0, atol=1e-5)


def test_readme_serving_example_runs(tmp_path, capsys):
  """The README's snippet, on an export of the committed Fashion-MNIST model (min-max on noise)."""
  cfg, params = load_checkpoint(get_config().model.checkpoint, get_config().model)
  images = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
  qparams = calibrate(build_model(cfg), params, images, quant_config(w_bits=4))
  path = os.path.join(tmp_path, "quantized.npz")
  np.savez(path, **export_integer(params, qparams))
  with open(os.path.join(ROOT, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index("## Serving through qwix"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert code.count("runs/fmnist/quantized.npz") == 1
  namespace = {}
  exec(compile(code.replace("runs/fmnist/quantized.npz", path), "README.md", "exec"), namespace)
  assert namespace["logits"].shape == (8, 10)
  assert f"{weight_bytes(np.load(path))}" in capsys.readouterr().out


def test_swin_export_served_with_its_patch_merges():
  from test_swin import images as swin_images, random_params as swin_params, tiny
  cfg = tiny()
  model, params, images = build_model(cfg), swin_params(cfg), jnp.asarray(swin_images(cfg))
  qparams = calibrate(model, params, images, quant_config(w_bits=4, w_symmetric=True))
  export = to_qwix(export_integer(params, qparams), model, images, activations=True)
  assert {site.rsplit("/", 1)[-1] for site in export.float_sites} == ATTENTION  # merge_ln served
  served = only(qparams, lambda path, _: path not in export.float_sites)
  expected = model.apply({"params": params, "quant": served}, images)
  np.testing.assert_allclose(serve(model, export, images), expected, rtol=0, atol=1e-5)
