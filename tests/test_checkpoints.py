"""Checkpoint import: each real format is written here from a random model, by hand, then loaded."""

import flax
import numpy as np
import pytest
from safetensors.numpy import save_file

from clamp_jax.models import build_model
from clamp_jax.models.checkpoints import (BIG_VISION, TIMM, VIT_JAX, CheckpointMismatchError,
                                          detect_format, load_checkpoint, read_flat)
from conftest import random_images, random_params, tiny_model_config


def flat_numpy(params):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


def write_vit_jax(path, params, pre_linen=False):
  flat = flat_numpy(params)
  if pre_linen:
    rename = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
              "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}
    flat = {"/".join(rename.get(p, p) if "encoderblock_" in k else p for p in k.split("/")): v
            for k, v in flat.items()}
  np.savez(path, **flat)


def write_big_vision(path, params, prefix="", scanned=False):
  flat = flat_numpy(params)
  flat["pos_embedding"] = flat.pop("Transformer/posembed_input/pos_embedding")
  if scanned:
    blocks = sorted({k.split("/")[1] for k in flat if k.startswith("Transformer/encoderblock_")})
    for leaf in [k.split("/", 2)[2] for k in flat if k.startswith("Transformer/encoderblock_0/")]:
      flat[f"Transformer/encoderblock/{leaf}"] = np.stack(
          [flat.pop(f"Transformer/{b}/{leaf}") for b in blocks])
  np.savez(path, **{prefix + k: v for k, v in flat.items()})


def timm_state_dict(params, num_layers):
  """The state dict timm's VisionTransformer would hold for these weights (PyTorch layouts)."""
  f = flat_numpy(params)
  sd = {"cls_token": f["cls"], "pos_embed": f["Transformer/posembed_input/pos_embedding"],
        "patch_embed.proj.weight": f["embedding/kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": f["embedding/bias"],
        "norm.weight": f["Transformer/encoder_norm/scale"],
        "norm.bias": f["Transformer/encoder_norm/bias"],
        "head.weight": f["head/kernel"].T, "head.bias": f["head/bias"]}
  for i in range(num_layers):
    b = f"Transformer/encoderblock_{i}/"
    att = b + "MultiHeadDotProductAttention_0/"
    d = f[att + "query/kernel"].shape[0]
    sd[f"blocks.{i}.norm1.weight"] = f[b + "LayerNorm_0/scale"]
    sd[f"blocks.{i}.norm1.bias"] = f[b + "LayerNorm_0/bias"]
    sd[f"blocks.{i}.attn.qkv.weight"] = np.concatenate(
        [f[att + p + "/kernel"].reshape(d, d).T for p in ("query", "key", "value")])
    sd[f"blocks.{i}.attn.qkv.bias"] = np.concatenate(
        [f[att + p + "/bias"].reshape(d) for p in ("query", "key", "value")])
    sd[f"blocks.{i}.attn.proj.weight"] = f[att + "out/kernel"].reshape(d, d).T
    sd[f"blocks.{i}.attn.proj.bias"] = f[att + "out/bias"]
    sd[f"blocks.{i}.norm2.weight"] = f[b + "LayerNorm_1/scale"]
    sd[f"blocks.{i}.norm2.bias"] = f[b + "LayerNorm_1/bias"]
    for j, fc in ((0, "fc1"), (1, "fc2")):
      sd[f"blocks.{i}.mlp.{fc}.weight"] = f[b + f"MlpBlock_0/Dense_{j}/kernel"].T
      sd[f"blocks.{i}.mlp.{fc}.bias"] = f[b + f"MlpBlock_0/Dense_{j}/bias"]
  return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def assert_same_logits(cfg, params, path, load_cfg=None):
  loaded_cfg, loaded = load_checkpoint(str(path), load_cfg or cfg)
  x = random_images(cfg)
  want = build_model(cfg).apply({"params": params}, x)
  got = build_model(loaded_cfg).apply({"params": loaded}, x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  return loaded_cfg


@pytest.mark.parametrize("pre_linen", [False, True])
def test_vit_jax_npz_reproduces_logits(tmp_path, pre_linen):
  cfg = tiny_model_config()
  params = random_params(cfg)
  path = tmp_path / "vit.npz"
  write_vit_jax(path, params, pre_linen)
  assert detect_format(read_flat(str(path))) == VIT_JAX
  assert_same_logits(cfg, params, path)


def test_vit_jax_gap_with_pre_logits_reads_shape_from_file(tmp_path):
  cfg = tiny_model_config(pool="gap", representation_size=24, num_heads=2, mlp_dim=40)
  params = random_params(cfg)
  write_vit_jax(tmp_path / "vit.npz", params)
  # The config names another shape; everything the file holds must win.
  wrong = tiny_model_config(pool="tok", hidden_size=64, num_layers=5, num_heads=8, mlp_dim=8)
  loaded_cfg = assert_same_logits(cfg, params, tmp_path / "vit.npz", load_cfg=wrong)
  assert (loaded_cfg.pool, loaded_cfg.representation_size, loaded_cfg.num_heads,
          loaded_cfg.mlp_dim, loaded_cfg.num_layers) == ("gap", 24, 2, 40, 2)


@pytest.mark.parametrize("prefix,scanned", [("", False), ("params/", False), ("", True)])
def test_big_vision_npz_reproduces_logits(tmp_path, prefix, scanned):
  cfg = tiny_model_config()
  params = random_params(cfg)
  path = tmp_path / "bv.npz"
  write_big_vision(path, params, prefix, scanned)
  assert detect_format(read_flat(str(path))) == BIG_VISION
  assert_same_logits(cfg, params, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_timm_state_dict_reproduces_logits(tmp_path, suffix):
  cfg = tiny_model_config()
  params = random_params(cfg)
  sd = timm_state_dict(params, cfg.num_layers)
  path = tmp_path / f"deit{suffix}"
  save_file(sd, str(path)) if suffix == ".safetensors" else np.savez(path, **sd)
  assert detect_format(read_flat(str(path)), str(path)) == TIMM
  assert_same_logits(cfg, params, path)


def test_timm_needs_num_heads_from_config(tmp_path):
  cfg = tiny_model_config()
  save_file(timm_state_dict(random_params(cfg), cfg.num_layers), str(tmp_path / "m.safetensors"))
  no_heads = tiny_model_config(num_heads=0)
  with pytest.raises(ValueError, match="num_heads"):
    load_checkpoint(str(tmp_path / "m.safetensors"), no_heads)


def test_position_embedding_is_resampled_to_a_larger_grid(tmp_path):
  cfg = tiny_model_config()  # 32 / 8 -> 4x4 grid
  params = random_params(cfg)
  write_vit_jax(tmp_path / "vit.npz", params)
  bigger = tiny_model_config(image_size=48)  # 6x6 grid
  loaded_cfg, loaded = load_checkpoint(str(tmp_path / "vit.npz"), bigger)
  pos = np.asarray(loaded["Transformer"]["posembed_input"]["pos_embedding"])
  old = np.asarray(params["Transformer"]["posembed_input"]["pos_embedding"])
  assert pos.shape == (1, 1 + 36, cfg.hidden_size)
  np.testing.assert_array_equal(pos[:, 0], old[:, 0])  # the class token's embedding is kept
  # Bilinear resampling keeps the range of the grid and its corners' neighbourhood.
  assert pos[0, 1:].min() >= old[0, 1:].min() - 1e-6 and pos[0, 1:].max() <= old[0, 1:].max() + 1e-6
  logits = build_model(loaded_cfg).apply({"params": loaded}, np.zeros((1, 48, 48, 3), np.float32))
  assert logits.shape == (1, cfg.num_classes)


def test_wrong_shape_lists_the_mismatch(tmp_path):
  cfg = tiny_model_config()
  flat = flat_numpy(random_params(cfg))
  key = "Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias"
  flat[key] = np.zeros(7, np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(CheckpointMismatchError, match="shape mismatches") as err:
    load_checkpoint(str(tmp_path / "bad.npz"), cfg)
  assert f"{key}: checkpoint (7,) vs model (32,)" in str(err.value)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
  cfg = tiny_model_config()
  flat = flat_numpy(random_params(cfg))
  missing = "Transformer/encoderblock_0/LayerNorm_1/scale"
  del flat[missing]
  flat["Transformer/encoderblock_0/extra/kernel"] = np.zeros(3, np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(CheckpointMismatchError) as err:
    load_checkpoint(str(tmp_path / "bad.npz"), cfg)
  message = str(err.value)
  assert "missing keys (1)" in message and missing in message
  assert "unexpected keys (1)" in message and "encoderblock_0/extra/kernel" in message


def test_timm_distilled_token_is_reported_as_unexpected(tmp_path):
  cfg = tiny_model_config()
  sd = timm_state_dict(random_params(cfg), cfg.num_layers)
  sd["dist_token"] = np.zeros((1, 1, cfg.hidden_size), np.float32)
  save_file(sd, str(tmp_path / "distilled.safetensors"))
  with pytest.raises(CheckpointMismatchError, match="dist_token"):
    load_checkpoint(str(tmp_path / "distilled.safetensors"), cfg)


def test_missing_file_and_unknown_format_are_named(tmp_path):
  cfg = tiny_model_config()
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    load_checkpoint(str(tmp_path / "nope.npz"), cfg)
  np.savez(tmp_path / "odd.npz", weights=np.zeros(3))
  with pytest.raises(ValueError, match="cannot tell the checkpoint format"):
    load_checkpoint(str(tmp_path / "odd.npz"), cfg)
