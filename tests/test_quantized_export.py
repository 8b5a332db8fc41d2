"""The integer export as a file: `export_integer` -> `.npz` -> `load_quantized` is the same model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models import build_model
from clamp_jax.models.checkpoints import CheckpointMismatchError, save_vit_npz
from clamp_jax.models.quantized import (SITES_KEY, calibrate, export_integer, load_quantized,
                                        quant_config)
from clamp_jax.quant import params as qp
from conftest import random_images, random_params


def export_to(path, model_cfg, qcfg):
  """Calibrates a random tiny model with `qcfg`, saves its export; `(model, params, qparams)`."""
  model = build_model(model_cfg)
  params = random_params(model_cfg)
  qparams = calibrate(model, params, jnp.asarray(random_images(model_cfg, n=4)), qcfg)
  np.savez(path, **export_integer(params, qparams))
  return model, params, qparams


@pytest.mark.parametrize("qcfg", [quant_config(w_bits=4, a_bits=8),
                                  quant_config(sites="all", w_bits=8, a_bits=8, softmax="log2", ptf=True)],
                         ids=["w4a8", "w8a8_log2_ptf"])
def test_loaded_export_gives_the_quantized_logits_exactly(tmp_path, tiny_cfg, qcfg):
  path = tmp_path / "quantized.npz"
  model, params, qparams = export_to(path, tiny_cfg, qcfg)
  loaded_cfg, loaded, loaded_q = load_quantized(str(path), tiny_cfg)
  assert loaded_cfg.to_dict() == tiny_cfg.to_dict()
  activations = qp.unflatten(dict(qp.iter_sites(qparams, qp.ACTIVATION)))
  # The static description came back too: it is part of the tree structure.
  assert jax.tree_util.tree_structure(loaded_q) == jax.tree_util.tree_structure(activations)
  x = random_images(tiny_cfg, n=5, seed=7)
  want = model.apply({"params": params, "quant": qparams}, x)
  got = build_model(loaded_cfg).apply({"params": loaded, "quant": loaded_q}, x)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(jnp.argmax(got, -1), jnp.argmax(want, -1))


def test_export_describes_every_site(tmp_path, tiny_cfg):
  _, _, qparams = export_to(tmp_path / "q.npz", tiny_cfg, quant_config(softmax="log2"))
  with np.load(tmp_path / "q.npz") as f:
    static = json.loads(f[SITES_KEY].item())
  assert set(static) == set(qp.flatten(qparams))
  probs = static["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/attn_probs"]
  assert probs == dict(kind=qp.ACTIVATION, signed=False, quantizer=qp.LOG2,
                       numel=probs["numel"]) and probs["numel"] > 0


def test_float_checkpoint_is_not_a_quantized_export(tmp_path, tiny_cfg):
  save_vit_npz(str(tmp_path / "float.npz"), random_params(tiny_cfg))
  with pytest.raises(ValueError, match=f"float.npz is not a clamp_jax quantized export.*{SITES_KEY}"):
    load_quantized(str(tmp_path / "float.npz"), tiny_cfg)


def test_missing_activation_arrays_are_named(tmp_path, tiny_cfg):
  path = tmp_path / "q.npz"
  export_to(path, tiny_cfg, quant_config())
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files if k != "quant/head_in.scale"}
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match="quant/head_in.scale"):
    load_quantized(str(path), tiny_cfg)


def test_export_that_does_not_fit_the_model_lists_the_mismatch(tmp_path, tiny_cfg):
  path = tmp_path / "q.npz"
  export_to(path, tiny_cfg, quant_config(w_bits=4))
  kernel = "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel"
  bias = "Transformer/encoderblock_0/LayerNorm_0/bias"
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files if not k.startswith(kernel + ".")}
  arrays[bias] = np.zeros(7, np.float32)
  np.savez(path, **arrays)
  with pytest.raises(CheckpointMismatchError) as err:
    load_quantized(str(path), tiny_cfg)
  message = str(err.value)
  assert "missing keys (1)" in message and kernel in message
  assert f"{bias}: checkpoint (7,) vs model (32,)" in message
