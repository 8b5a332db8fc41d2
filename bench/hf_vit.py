"""Our ViT's weights in HuggingFace transformers' `FlaxViTForImageClassification` (no download).

Only `bench/foreign_vs_ours.py` and its test need it (the same weights on both sides of a
comparison), so it lives beside the benchmark rather than in the package. HuggingFace's ViT reads
the class token and has no pre-logits layer: a `pool="gap"` or `representation_size` model has no
HF equivalent and is refused.
"""

import flax
import ml_collections
import numpy as np

BLOCK_NAMES = {  # ours under Transformer/encoderblock_{i} -> HF's under vit/encoder/layer/{i}
    "LayerNorm_0": "layernorm_before", "LayerNorm_1": "layernorm_after",
    "MultiHeadDotProductAttention_0/query": "attention/attention/query",
    "MultiHeadDotProductAttention_0/key": "attention/attention/key",
    "MultiHeadDotProductAttention_0/value": "attention/attention/value",
    "MultiHeadDotProductAttention_0/out": "attention/output/dense",
    "MlpBlock_0/Dense_0": "intermediate/dense", "MlpBlock_0/Dense_1": "output/dense",
}
TOP_NAMES = {"embedding": "vit/embeddings/patch_embeddings/projection",
             "cls": "vit/embeddings/cls_token",
             "Transformer/posembed_input/pos_embedding": "vit/embeddings/position_embeddings",
             "Transformer/encoder_norm": "vit/layernorm", "head": "classifier"}


def hf_vit(model_cfg: ml_collections.ConfigDict, params):
  """`(module, variables)`: the linen module of a `FlaxViTForImageClassification` of
  `model_cfg`'s shape (it takes NHWC images, as ours) and `{"params": ...}` holding `params`."""
  from transformers import FlaxViTForImageClassification, ViTConfig
  if model_cfg.pool != "tok" or model_cfg.get("representation_size"):
    raise ValueError("HuggingFace's ViT classifies the class token with no pre-logits layer; got "
                     f"pool={model_cfg.pool!r}, representation_size="
                     f"{model_cfg.get('representation_size')}")
  config = ViTConfig(
      hidden_size=model_cfg.hidden_size, num_hidden_layers=model_cfg.num_layers,
      num_attention_heads=model_cfg.num_heads, intermediate_size=model_cfg.mlp_dim,
      image_size=model_cfg.image_size, patch_size=model_cfg.patch_size,
      num_channels=model_cfg.channels, num_labels=model_cfg.num_classes,
      hidden_act="gelu_new" if model_cfg.gelu_approximate else "gelu",  # tanh form / exact
      layer_norm_eps=model_cfg.layernorm_epsilon, hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, qkv_bias=True)
  module = FlaxViTForImageClassification(config, _do_init=False).module
  out = {}
  for path, value in flax.traverse_util.flatten_dict(params, sep="/").items():
    value = np.asarray(value, np.float32)
    if path in TOP_NAMES:  # cls, pos_embedding
      out[TOP_NAMES[path]] = value
      continue
    prefix, leaf = path.rsplit("/", 1)
    if not prefix.startswith("Transformer/encoderblock_"):
      out[f"{TOP_NAMES[prefix]}/{leaf}"] = value
      continue
    _, block, name = prefix.split("/", 2)
    if name.endswith("/out") and leaf == "kernel":  # (heads, head_dim, D) -> (D, D)
      value = value.reshape(-1, value.shape[-1])
    elif name.startswith("MultiHead"):  # (D, heads, head_dim) -> (D, D); (heads, head_dim) -> (D,)
      value = value.reshape(value.shape[0], -1) if leaf == "kernel" else value.reshape(-1)
    out[f"vit/encoder/layer/{block.rsplit('_', 1)[1]}/{BLOCK_NAMES[name]}/{leaf}"] = value
  return module, {"params": flax.traverse_util.unflatten_dict(out, sep="/")}
