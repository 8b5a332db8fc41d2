"""The Swin Transformer against a numpy reference written on timm's state dict, and its timm import.

The reference attends over ALL tokens of a stage with a mask that keeps only pairs inside the same
shifted window (no roll, no window partition) and adds the relative position bias by the true
offsets; it reads timm's PyTorch layouts (fused qkv, `(out, in)` weights, the 2x2 merge order), so
a layout mistake in the converter or the model shows up as a logits difference.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from clamp_jax.models import build_model, model_config
from clamp_jax.models.checkpoints.loader import (CheckpointError, CheckpointMismatchError,
                                                 file_model_config, load_checkpoint, read_flat)
from clamp_jax.models.checkpoints.swin_timm import (infer_swin_shape, is_timm_swin,
                                                    load_swin_checkpoint, save_timm_swin,
                                                    swin_file_config, swin_from_timm,
                                                    swin_to_timm, timm_layout)
from clamp_jax.models.swin import (SWIN_PRESETS, PatchMerging, SwinTransformer, build_swin,
                                   merge_neighbours, shifted_window_mask, stage_window,
                                   swin_config)
from clamp_jax.models.vit import Projection

# Stage 2 of NO_SHIFT covers its whole 7x7 grid (one window, no shift); SHIFTED shifts in both.
NO_SHIFT = dict(image_size=28, channels=1, patch_size=2, embed_dim=12, depths=(2, 2),
                num_heads=(2, 4), window_size=7, mlp_ratio=3.0, num_classes=5)
SHIFTED = dict(image_size=32, channels=3, patch_size=2, embed_dim=8, depths=(2, 2),
               num_heads=(2, 2), window_size=4, mlp_ratio=2.0, num_classes=4)


def tiny(shape=None, **overrides):
  return swin_config(**{**(shape or SHIFTED), **overrides})


def random_params(cfg, seed=0):
  """Every leaf N(0, 0.3^2) (numpy: no per-shape compilation of initializers)."""
  dummy = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  shapes = jax.eval_shape(build_swin(cfg).init, jax.random.PRNGKey(0), dummy)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)


def images(cfg, n=2, seed=1):
  shape = (n, cfg.image_size, cfg.image_size, cfg.channels)
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def flat_numpy(params):
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params, sep="/").items()}


# ---- numpy reference on a timm (>= 0.9) state dict ----------------------------------------------

def ln(x, w, b, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x, sd, name):
  y = x @ sd[name + ".weight"].T
  return y + sd[name + ".bias"] if name + ".bias" in sd else y


def ref_block(x, sd, t, grid, window, shift, heads):
  """timm's block over `[B, N, D]` tokens, as masked full attention."""
  b, n, d = x.shape
  hd = d // heads
  y = ln(x, sd[t + "norm1.weight"], sd[t + "norm1.bias"])
  q, k, v = linear(y, sd, t + "attn.qkv").reshape(b, n, 3, heads, hd).transpose(2, 0, 3, 1, 4)
  logits = q @ k.swapaxes(-1, -2) * hd ** -0.5
  ys, xs = np.divmod(np.arange(n), grid[1])
  group_y, group_x = (ys - shift[0]) // window[0], (xs - shift[1]) // window[1]
  same = (group_y[:, None] == group_y[None]) & (group_x[:, None] == group_x[None])
  dy, dx = ys[:, None] - ys[None], xs[:, None] - xs[None]
  row = np.where(same, (dy + window[0] - 1) * (2 * window[1] - 1) + dx + window[1] - 1, 0)
  bias = sd[t + "attn.relative_position_bias_table"][row].transpose(2, 0, 1)
  logits = np.where(same, logits + bias, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  attn = linear((probs @ v).transpose(0, 2, 1, 3).reshape(b, n, d), sd, t + "attn.proj")
  x = x + attn
  h = linear(ln(x, sd[t + "norm2.weight"], sd[t + "norm2.bias"]), sd, t + "mlp.fc1")
  h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
  return x + linear(h, sd, t + "mlp.fc2")


def ref_merge(x, sd, name):
  """timm's PatchMerging: x0..x3 = the (0,0), (1,0), (0,1), (1,1) neighbours as (row, col)."""
  x = np.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
  x = ln(x, sd[name + ".norm.weight"], sd[name + ".norm.bias"])
  return x @ sd[name + ".reduction.weight"].T


def ref_logits(sd, cfg, x):
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  w, p = sd["patch_embed.proj.weight"], cfg.patch_size
  b, hh, ww, c = x.shape
  patches = x.astype(np.float64).reshape(b, hh // p, p, ww // p, p, c)
  x = np.einsum("biyjxc,dcyx->bijd", patches, w) + sd["patch_embed.proj.bias"]
  x = ln(x, sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
  for s, depth in enumerate(cfg.depths):
    if s:
      x = ref_merge(x, sd, f"layers.{s}.downsample")
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    for j in range(depth):
      window, shift = stage_window((gh, gw), cfg.window_size, shifted=j % 2 == 1)
      x = ref_block(x, sd, f"layers.{s}.blocks.{j}.", (gh, gw), window, shift, cfg.num_heads[s])
    x = x.reshape(b, gh, gw, d)
  x = ln(x.reshape(b, -1, x.shape[-1]), sd["norm.weight"], sd["norm.bias"]).mean(1)
  return x @ sd["head.fc.weight"].T + sd["head.fc.bias"]


# ---- the model against the reference ------------------------------------------------------------

@pytest.mark.parametrize("shape", [NO_SHIFT, SHIFTED], ids=["no_shift_stage2", "shifted"])
def test_model_equals_the_masked_full_attention_reference(shape):
  cfg = tiny(shape)
  params = random_params(cfg)
  sd = swin_to_timm(flat_numpy(params), "new")
  x = images(cfg)
  np.testing.assert_allclose(build_swin(cfg).apply({"params": params}, x), ref_logits(sd, cfg, x),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [NO_SHIFT, SHIFTED], ids=["no_shift_stage2", "shifted"])
def test_each_block_equals_the_reference_block(shape):
  cfg = tiny(shape)
  params = random_params(cfg, seed=3)
  sd = {k: v.astype(np.float64) for k, v in swin_to_timm(flat_numpy(params), "new").items()}
  _, inter = build_swin(cfg).apply({"params": params}, images(cfg), return_intermediates=True)
  grid = cfg.image_size // cfg.patch_size
  i = 0
  for s, depth in enumerate(cfg.depths):
    grid = grid // 2 if s else grid
    for j in range(depth):
      window, shift = stage_window((grid, grid), cfg.window_size, shifted=j % 2 == 1)
      want = ref_block(np.asarray(inter["block_in"][i], np.float64), sd, f"layers.{s}.blocks.{j}.",
                       (grid, grid), window, shift, cfg.num_heads[s])
      np.testing.assert_allclose(inter["block"][i], want, rtol=1e-4, atol=1e-4,
                                 err_msg=f"block {i}")
      i += 1


def test_shift_mask_separates_the_wrapped_regions():
  mask = shifted_window_mask((8, 8), (4, 4), (2, 2))
  assert mask.shape == (4, 16, 16) and set(np.unique(mask)) == {0.0, -100.0}
  assert not mask[0].any()  # the first window lies inside the grid: one region
  # The last window holds the corners of the rolled grid: 4 regions of 2x2 tokens each.
  assert (mask[3] == 0).sum() == 4 * 4 * 4
  assert shifted_window_mask((8, 8), (4, 4), (0, 0)) is None


@pytest.mark.parametrize("grid,window,shift", [
    ((12, 16), (4, 4), (2, 2)), ((14, 14), (7, 7), (3, 3)), ((6, 8), (6, 4), (0, 2))])
def test_shift_mask_equals_timms_painted_regions(grid, window, shift):
  """timm paints 3 x 3 label rectangles (rows [0, H-w), [H-w, H-s), [H-s, H), the same for
  columns; a zero shift makes the last range the whole axis), masks pairs of unequal labels."""
  labels = np.zeros(grid)
  count = 0
  for rows in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
    for cols in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
      labels[rows[0]:rows[1], cols[0]:cols[1]] = count
      count += 1
  nh, nw = grid[0] // window[0], grid[1] // window[1]
  per_window = labels.reshape(nh, window[0], nw, window[1]).transpose(0, 2, 1, 3).reshape(
      nh * nw, -1)
  want = np.where(per_window[:, :, None] != per_window[:, None, :], -100.0, 0.0)
  np.testing.assert_array_equal(shifted_window_mask(grid, window, shift), want)


def test_window_at_least_the_grid_is_one_unshifted_window():
  assert stage_window((7, 7), 7, shifted=True) == ((7, 7), (0, 0))
  assert stage_window((4, 4), 7, shifted=True) == ((4, 4), (0, 0))
  assert stage_window((14, 14), 7, shifted=True) == ((7, 7), (3, 3))
  assert stage_window((5, 9), 4, shifted=True) == ((4, 4), (2, 2))
  assert stage_window((3, 9), 4, shifted=True) == ((3, 4), (0, 2))
  # Image 16 / patch 2: grids 8 and 4 under a window of 7 -> the second stage's table is (2*4-1)^2.
  cfg = tiny(image_size=16, window_size=7)
  table = "MultiHeadDotProductAttention_0/relative_position_bias_table"
  params = random_params(cfg)["Transformer"]
  assert params["encoderblock_1"]["MultiHeadDotProductAttention_0"][
      "relative_position_bias_table"].shape == (13 * 13, 2), table
  assert params["encoderblock_3"]["MultiHeadDotProductAttention_0"][
      "relative_position_bias_table"].shape == (7 * 7, 2), table


def test_patch_merging_uses_timms_channel_order():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  merged = np.asarray(merge_neighbours(jnp.asarray(x)))
  for k, (dy, dx) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
    np.testing.assert_array_equal(merged[..., 3 * k:3 * k + 3], x[:, dy::2, dx::2])
  # The module: LayerNorm(4C) then the bias-free reduction, against timm's order in numpy.
  module = PatchMerging()
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(2, 24, 3)), jnp.float32)
  rng = np.random.default_rng(1)
  p = {"norm": {"scale": rng.normal(size=12), "bias": rng.normal(size=12)},
       "reduction": {"kernel": rng.normal(size=(12, 6))}}
  out, grid = module.apply({"params": p}, tokens, (4, 6))  # no reduction bias is asked for
  assert grid == (2, 3)
  sd = {"m.norm.weight": p["norm"]["scale"], "m.norm.bias": p["norm"]["bias"],
        "m.reduction.weight": np.asarray(p["reduction"]["kernel"]).T}
  want = ref_merge(np.asarray(tokens).reshape(2, 4, 6, 3), sd, "m").reshape(2, 6, 6)
  np.testing.assert_allclose(out, want, atol=1e-5)


def test_odd_grids_are_padded_like_timm():
  # A 5x7 stream entering the last (shifted, window 4) block: rolled, zero-padded to 8x8.
  cfg = tiny()
  x = np.random.default_rng(0).normal(size=(2, 5, 7, 16)).astype(np.float32)
  logits, inter = build_swin(cfg).apply({"params": random_params(cfg)}, x, start_block=3,
                                        return_intermediates=True)
  assert logits.shape == (2, cfg.num_classes) and np.isfinite(logits).all()
  assert inter["block"][0].shape == (2, 35, 16)
  merged = np.asarray(merge_neighbours(jnp.asarray(x[..., :3])))  # odd sides: a zero row/column
  assert merged.shape == (2, 3, 4, 12)
  np.testing.assert_array_equal(merged[:, 2, :, 3:6], 0)  # (1, 0) neighbours of the last row
  np.testing.assert_array_equal(merged[:, :, 3, 6:9], 0)  # (0, 1) neighbours of the last column


# ---- quantization hooks, intermediates, start_block ---------------------------------------------

def test_empty_quant_is_float_and_start_block_reproduces_logits():
  cfg = tiny(depths=(2, 3), num_heads=(2, 2))
  model, params, x = build_swin(cfg), random_params(cfg), images(cfg)
  logits, inter = model.apply({"params": params}, x, return_intermediates=True)
  np.testing.assert_array_equal(logits, model.apply({"params": params, "quant": {}}, x))
  assert isinstance(inter["block_in"], tuple) and len(inter["block_in"]) == 5
  assert [a.shape for a in inter["block"]] == [(2, 256, 8)] * 2 + [(2, 64, 16)] * 3
  assert [a.shape for a in inter["attn"]] == [a.shape for a in inter["block"]]
  np.testing.assert_array_equal(inter["block_in"][3], inter["block"][2])
  for l in range(5):  # block 2 is the first after the merge: its input is the merged stream
    got, rest = model.apply({"params": params}, inter["block_in"][l], start_block=l,
                            return_intermediates=True)
    np.testing.assert_allclose(got, logits, atol=1e-5, err_msg=f"start_block={l}")
    assert len(rest["block"]) == 5 - l
  side = cfg.image_size // cfg.patch_size // 2  # also [B, H, W, D] (for non-square grids)
  got = model.apply({"params": params}, inter["block_in"][2].reshape(2, side, side, 16),
                    start_block=2)
  np.testing.assert_allclose(got, logits, atol=1e-5)
  with pytest.raises(ValueError, match="takes width 16"):
    model.apply({"params": params}, inter["block_in"][0], start_block=2)


def test_sites_are_recorded_under_the_vit_names():
  cfg = tiny()
  _, state = build_swin(cfg).apply({"params": random_params(cfg)}, images(cfg),
                                   mutable=["quant_observe"])
  seen = {k: v[0].shape for k, v in
          flax.traverse_util.flatten_dict(state["quant_observe"], sep="/").items()}
  attn = "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/"
  # 16x16 grid, window 4: 16 windows of 16 tokens; logits [B, windows, heads, N, N].
  assert seen[attn + "attn_logits"] == (2, 16, 2, 16, 16)
  assert seen[attn + "q"] == (2, 16, 16, 2, 4)
  assert seen["Transformer/downsample_1/merge_ln"] == (2, 64, 32)
  assert seen["Transformer/downsample_1/reduction/kernel"] == (32, 16)
  assert seen["Transformer/downsample_1/merge_out"] == (2, 64, 16)  # the next stage's stream
  assert seen["embedding/kernel"] == (2 * 2 * 3, 8)
  assert seen["patch_embed"] == (2, 16, 16, 8)
  for site in ("image", "head_in", "logits", "Transformer/encoder_norm_out",
               "Transformer/encoderblock_3/ln1", "Transformer/encoderblock_3/residual2",
               "Transformer/encoderblock_0/MlpBlock_0/gelu",
               "Transformer/encoderblock_0/MlpBlock_0/Dense_1/kernel",
               attn + "k", attn + "v", attn + "attn_probs", attn + "attn_v", attn + "attn_out",
               attn + "query/kernel", attn + "out/kernel"):
    assert site in seen, site
  assert len([k for k in seen if k.endswith("/ln1")]) == 4


def test_projection_without_bias_and_vit_default_unchanged():
  x = jnp.ones((1, 4))
  assert set(Projection(3).init(jax.random.PRNGKey(0), x)["params"]) == {"kernel", "bias"}
  assert set(Projection(3, use_bias=False).init(jax.random.PRNGKey(0), x)["params"]) == {"kernel"}


# ---- timm checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape,layout,prefix,suffix", [
    (NO_SHIFT, "new", "", ".safetensors"), (NO_SHIFT, "old", "model.", ".npz"),
    (SHIFTED, "new", "model.", ".npz"), (SHIFTED, "old", "", ".safetensors")])
def test_timm_files_reproduce_logits_with_the_shape_from_the_file(tmp_path, shape, layout, prefix,
                                                                   suffix):
  cfg = tiny(shape)
  params = random_params(cfg, seed=5)
  sd = swin_to_timm(flat_numpy(params), layout, image_size=cfg.image_size)
  if layout == "old":
    assert "layers.0.downsample.reduction.weight" in sd and "head.weight" in sd
    assert "layers.1.blocks.0.attn.relative_position_index" in sd
    assert "layers.0.blocks.1.attn_mask" in sd  # stage 1 (grids 14, 16) is shifted in both
    assert ("layers.1.blocks.1.attn_mask" in sd) == (shape is SHIFTED)  # 7x7 grid, window 7
  else:
    assert "layers.1.downsample.reduction.weight" in sd and "head.fc.weight" in sd
    assert not any(k.endswith(("attn_mask", "relative_position_index")) for k in sd)
  path = str(tmp_path / f"swin{suffix}")
  sd = {prefix + k: v for k, v in sd.items()}
  if prefix:  # a training checkpoint: only the `model` entry is the model
    sd["optimizer.state.0.exp_avg"] = np.zeros(3, np.float32)
  save_file(sd, path) if suffix == ".safetensors" else np.savez(path, **sd)
  raw = read_flat(path)
  assert is_timm_swin(raw) and timm_layout(raw) == layout
  loaded_cfg, loaded = load_swin_checkpoint(path, swin_config(image_size=cfg.image_size))
  assert {f: loaded_cfg[f] for f in shape} == shape
  x = images(cfg)
  np.testing.assert_allclose(build_swin(loaded_cfg).apply({"params": loaded}, x),
                             build_swin(cfg).apply({"params": params}, x), atol=1e-5, rtol=0)


def test_converter_splits_qkv_and_transposes_like_timm():
  cfg = tiny()
  sd = swin_to_timm(flat_numpy(random_params(cfg)), "new")
  ours = swin_from_timm(sd)
  qkv = sd["layers.1.blocks.0.attn.qkv.weight"]  # (3 * 16, 16): rows q, then k, then v
  key = ours["Transformer/encoderblock_2/MultiHeadDotProductAttention_0/key/kernel"]
  assert key.shape == (16, 2, 8)
  np.testing.assert_array_equal(key[:, 1, 3], qkv[16 + 8 + 3])  # head 1, channel 3 of k
  conv = sd["patch_embed.proj.weight"]  # (D, C, p, p)
  np.testing.assert_array_equal(ours["embedding/kernel"][1, 0, 2, 5], conv[5, 2, 1, 0])
  np.testing.assert_array_equal(ours["Transformer/downsample_1/reduction/kernel"],
                                sd["layers.1.downsample.reduction.weight"].T)
  assert infer_swin_shape(sd) == {k: cfg[k] for k in infer_swin_shape(sd)}


def test_a_mismatched_file_lists_missing_unexpected_and_misshaped_keys(tmp_path):
  cfg = tiny()
  sd = swin_to_timm(flat_numpy(random_params(cfg)), "new")
  del sd["layers.1.blocks.1.norm2.bias"]
  sd["layers.0.blocks.0.attn.logit_scale"] = np.zeros(2, np.float32)
  sd["norm.weight"] = np.zeros(7, np.float32)
  save_file(sd, str(tmp_path / "bad.safetensors"))
  with pytest.raises(CheckpointMismatchError) as err:
    load_swin_checkpoint(str(tmp_path / "bad.safetensors"), swin_config(image_size=32))
  message = str(err.value)
  assert "missing keys (1)" in message and "Transformer/encoderblock_3/LayerNorm_1/bias" in message
  assert "unexpected keys (1)" in message and "layers.0.blocks.0.attn.logit_scale" in message
  assert "Transformer/encoder_norm/scale: checkpoint (7,) vs model (16,)" in message


def test_the_file_decides_the_shape_and_a_pinned_field_that_contradicts_it_stops(tmp_path):
  cfg = tiny()
  path = str(tmp_path / "m.safetensors")
  save_file(swin_to_timm(flat_numpy(random_params(cfg)), "new"), path)
  guess = swin_config("Swin-T", image_size=32)  # a preset's shape is a guess: replaced
  assert load_swin_checkpoint(path, guess)[0].depths == (2, 2)
  wrong = swin_config(image_size=32, depths=(2, 2, 2), num_heads=(2, 2), window_size=4)
  with pytest.raises(CheckpointError,
                     match=r"config.model.depths=\(2, 2, 2\) but the file holds \(2, 2\)") as err:
    load_swin_checkpoint(path, wrong, pinned={"depths", "num_heads", "image_size"})
  assert "num_heads" not in str(err.value)  # the agreeing fields are not listed
  with pytest.raises(CheckpointError, match=r"num_heads=\(3, 6\) but the file holds \(2, 2\)"):
    swin_file_config(path, swin_config(image_size=32, num_heads=(3, 6)), pinned={"num_heads"})
  np.savez(tmp_path / "vit.npz", **{"blocks.0.norm1.weight": np.zeros(3)})
  with pytest.raises(CheckpointError, match="not a timm Swin checkpoint"):
    load_swin_checkpoint(str(tmp_path / "vit.npz"), swin_config())


def test_configs_dispatch_on_the_family_and_a_vit_config_names_a_swin_file(tmp_path):
  cfg = tiny()
  params = random_params(cfg)
  path = str(tmp_path / "swin.npz")
  save_timm_swin(path, params)  # timm's layout, written from our params
  assert is_timm_swin(read_flat(path)) and timm_layout(read_flat(path)) == "new"
  loaded_cfg, loaded = load_checkpoint(path, swin_config(image_size=32))
  assert isinstance(build_model(loaded_cfg), SwinTransformer)
  x = images(cfg)
  np.testing.assert_array_equal(build_model(loaded_cfg).apply({"params": loaded}, x),
                                build_swin(cfg).apply({"params": params}, x))
  assert file_model_config(path, swin_config(image_size=32)).embed_dim == cfg.embed_dim
  with pytest.raises(CheckpointError, match="a timm Swin checkpoint, but config.model is a ViT"):
    load_checkpoint(path, model_config())
  with pytest.raises(ValueError, match="config.model.family='deit'"):
    build_model(swin_config(family="deit"))


# ---- presets and config -------------------------------------------------------------------------

def test_presets_have_the_published_shapes_and_swin_t_size():
  assert swin_config("Swin-S").depths == (2, 2, 18, 2)
  b = swin_config("Swin-B")
  assert (b.embed_dim, b.num_heads, b.window_size, b.patch_size) == (128, (4, 8, 16, 32), 7, 4)
  t = swin_config("Swin-T")
  assert (t.family, t.image_size, t.num_classes, t.mlp_ratio) == ("swin", 224, 1000, 4.0)
  shapes = jax.eval_shape(build_swin(t).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes)) == 28_288_354
  assert len(SWIN_PRESETS) == 3
  with pytest.raises(ValueError, match="unknown Swin model fields"):
    swin_config(hidden_size=3)
  with pytest.raises(ValueError, match="unknown Swin preset"):
    swin_config("Swin-XL")
  with pytest.raises(ValueError, match="unset"):
    build_swin(swin_config())
