"""The ViT forward against independent references (lax conv, flax attention) and its options."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models import PRESETS, build_model, model_config
from clamp_jax.models.vit import MultiHeadDotProductAttention, PatchEmbedding
from conftest import random_images, random_params, tiny_model_config


def test_patch_embedding_equals_a_strided_convolution():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 20, 20, 3)), jnp.float32)
  module = PatchEmbedding(hidden_size=8, patch_size=5)
  variables = module.init(jax.random.PRNGKey(0), x)
  p = variables["params"]
  want = jax.lax.conv_general_dilated(x, p["kernel"], (5, 5), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
  np.testing.assert_allclose(module.apply(variables, x), want, atol=1e-5)


def test_attention_equals_flax_multi_head_attention_with_the_same_params():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 7, 16)), jnp.float32)
  ours = MultiHeadDotProductAttention(num_heads=4)
  variables = ours.init(jax.random.PRNGKey(0), x)
  variables = jax.tree_util.tree_map(
      lambda a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(3), a.shape), variables)
  reference = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=16, out_features=16)
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x, x), atol=1e-5)


def test_intermediates_are_per_block_and_do_not_change_logits(tiny_cfg):
  model = build_model(tiny_cfg)
  params = random_params(tiny_cfg)
  x = random_images(tiny_cfg, n=2)
  logits, inter = model.apply({"params": params}, x, return_intermediates=True)
  tokens = (tiny_cfg.image_size // tiny_cfg.patch_size) ** 2 + 1
  assert inter["attn"].shape == (tiny_cfg.num_layers, 2, tokens, tiny_cfg.hidden_size)
  assert inter["block"].shape == inter["attn"].shape
  np.testing.assert_array_equal(logits, model.apply({"params": params}, x))
  # The block output is the residual stream: block input + attention + MLP, so it differs.
  assert not np.allclose(inter["block"][0], inter["attn"][0])


def test_a_block_module_and_the_head_alone_rebuild_the_logits(tiny_cfg):
  model = build_model(tiny_cfg)
  params = random_params(tiny_cfg)
  x = random_images(tiny_cfg, n=2)
  logits, inter = model.apply({"params": params}, x, return_intermediates=True)
  stream = inter["block_in"][0]
  for i in range(tiny_cfg.num_layers):
    stream, _ = model.block_module().apply(
        {"params": params["Transformer"][f"encoderblock_{i}"]}, stream)
    np.testing.assert_allclose(stream, inter["block"][i], atol=1e-5)
  head = model.apply({"params": params}, stream, start_block=tiny_cfg.num_layers)
  np.testing.assert_allclose(head, logits, atol=1e-5)
  with pytest.raises(ValueError, match="runs no block"):
    model.apply({"params": params}, stream, start_block=tiny_cfg.num_layers,
                return_intermediates=True)


def test_gap_pooling_has_no_class_token_and_uses_the_mean():
  cfg = tiny_model_config(pool="gap")
  params = random_params(cfg)
  assert "cls" not in params
  logits, inter = build_model(cfg).apply({"params": params}, random_images(cfg, 2),
                                         return_intermediates=True)
  assert inter["block"].shape[2] == (cfg.image_size // cfg.patch_size) ** 2
  assert logits.shape == (2, cfg.num_classes)


def test_exact_and_approximate_gelu_differ():
  cfg = tiny_model_config()
  params = random_params(cfg)
  x = random_images(cfg, 2)
  exact = build_model(cfg).apply({"params": params}, x)
  approx = build_model(tiny_model_config(gelu_approximate=True)).apply({"params": params}, x)
  assert not np.allclose(exact, approx, atol=1e-7)


@pytest.mark.parametrize("name,width,depth,heads,patch", [
    ("ViT-B/16", 768, 12, 12, 16), ("ViT-L/32", 1024, 24, 16, 32), ("ViT-Ti/16", 192, 12, 3, 16),
    ("DeiT-S", 384, 12, 6, 16)])
def test_presets_have_the_published_shapes(name, width, depth, heads, patch):
  cfg = model_config(name)
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.patch_size) == (width, depth, heads,
                                                                               patch)
  assert cfg.gelu_approximate == name.startswith("ViT")  # vision_transformer: tanh GELU
  assert len(PRESETS) == 11


def test_param_count_of_deit_s_matches_the_paper():
  cfg = model_config("DeiT-S")
  shapes = jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  count = sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes))
  assert 21.9e6 < count < 22.2e6  # DeiT-S: 22M parameters


def test_bad_shapes_give_clear_errors():
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    cfg = tiny_model_config(num_heads=5)
    build_model(cfg).init(jax.random.PRNGKey(0), random_images(cfg, 1))
  with pytest.raises(ValueError, match="unknown model fields"):
    model_config(depth=3)
  with pytest.raises(ValueError, match="unknown model preset"):
    model_config("ViT-XXL/7")
