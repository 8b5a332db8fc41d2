"""The three checkpoint layouts, each converted to ours (vision_transformer linen names).

Ours is a flat dict of `/`-joined names, e.g.
`Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel` of shape
`(hidden, heads, head_dim)`. Converters only rename and re-lay out arrays; the loader
checks the result against the model.
"""

import re
from typing import Dict, Optional

import numpy as np

Flat = Dict[str, np.ndarray]

VIT_JAX, BIG_VISION, TIMM = "vision_transformer", "big_vision", "timm"
POSEMB = "Transformer/posembed_input/pos_embedding"


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read as weights; the message starts with the file's path."""


# Model fields a format implies beyond the shapes: timm's ViTs use PyTorch's exact GELU.
IMPLIED_FIELDS = {TIMM: {"gelu_approximate": False}}

# vision_transformer's pre-linen checkpoints number the sub-modules of a block 0..3.
_PRE_LINEN = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
              "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}


def detect_format(flat: Flat, path: str = "") -> str:
  """Which layout `flat` is in, from its names."""
  keys = set(flat)
  if path.endswith(".safetensors") or any(k.startswith(("blocks.", "patch_embed.")) or
                                          k in ("pos_embed", "cls_token") for k in keys):
    return TIMM
  if POSEMB in keys or any(re.search(r"encoderblock_\d+/MlpBlock_3/", k) for k in keys):
    return VIT_JAX
  if {"pos_embedding", "params/pos_embedding"} & keys or any(
      k.startswith("params/") for k in keys):
    return BIG_VISION
  raise CheckpointError(
      f"{path or 'checkpoint'}: cannot tell the checkpoint format: expected vision_transformer "
      f"names ({POSEMB}), big_vision names (pos_embedding at top level) or timm names "
      f"(patch_embed.proj.weight, blocks.N...); first keys: {sorted(keys)[:8]}")


def from_vit_jax(flat: Flat) -> Flat:
  """vision_transformer `.npz`: linen names already; pre-linen block names are renamed."""
  out = {}
  for key, value in flat.items():
    parts = [_PRE_LINEN.get(p, p) if "encoderblock_" in key else p for p in key.split("/")]
    out["/".join(parts)] = value
  return out


def from_big_vision(flat: Flat) -> Flat:
  """big_vision `.npz`: optional `params/` prefix, top-level `pos_embedding`, scanned blocks unstacked."""
  out = {}
  for key, value in flat.items():
    key = key[len("params/"):] if key.startswith("params/") else key
    if key == "pos_embedding":
      key = POSEMB
    scanned = re.match(r"Transformer/encoderblock/(.*)", key)
    if scanned:  # `scan_layers=True`: one stacked block with a leading depth axis
      for i, layer in enumerate(value):
        out[f"Transformer/encoderblock_{i}/{scanned.group(1)}"] = layer
      continue
    out[key] = value
  return out


_TIMM_BLOCK = {
    "norm1.weight": "LayerNorm_0/scale", "norm1.bias": "LayerNorm_0/bias",
    "norm2.weight": "LayerNorm_1/scale", "norm2.bias": "LayerNorm_1/bias",
    "mlp.fc1.weight": "MlpBlock_0/Dense_0/kernel", "mlp.fc1.bias": "MlpBlock_0/Dense_0/bias",
    "mlp.fc2.weight": "MlpBlock_0/Dense_1/kernel", "mlp.fc2.bias": "MlpBlock_0/Dense_1/bias",
}
_TIMM_TOP = {
    "cls_token": "cls", "pos_embed": POSEMB,
    "patch_embed.proj.weight": "embedding/kernel", "patch_embed.proj.bias": "embedding/bias",
    "norm.weight": "Transformer/encoder_norm/scale", "norm.bias": "Transformer/encoder_norm/bias",
    "pre_logits.fc.weight": "pre_logits/kernel", "pre_logits.fc.bias": "pre_logits/bias",
    "head.weight": "head/kernel", "head.bias": "head/bias",
}


def from_timm(flat: Flat, num_heads: Optional[int]) -> Flat:
  """timm state dict (PyTorch layouts); `num_heads` is not in the file and comes from the config.

  Names that have no counterpart (e.g. `dist_token`, `fc_norm`) are kept as they are so the
  loader reports them as unexpected.
  """
  out = {}
  for key, value in flat.items():
    for prefix in ("module.", "model."):
      key = key[len(prefix):] if key.startswith(prefix) else key
    value = np.asarray(value)
    block = re.match(r"blocks\.(\d+)\.(.*)", key)
    if key in _TIMM_TOP:
      name = _TIMM_TOP[key]
      if key == "patch_embed.proj.weight":
        value = value.transpose(2, 3, 1, 0)  # (out, in, kh, kw) -> (kh, kw, in, out)
      elif value.ndim == 2 and key.endswith(".weight"):
        value = value.T  # Linear (out, in) -> Dense (in, out)
      out[name] = value
    elif block and block.group(2) in _TIMM_BLOCK:
      value = value.T if value.ndim == 2 else value
      out[f"Transformer/encoderblock_{block.group(1)}/{_TIMM_BLOCK[block.group(2)]}"] = value
    elif block and block.group(2).startswith(("attn.qkv.", "attn.proj.")):
      out.update(_timm_attention(block.group(1), block.group(2), value, num_heads))
    else:
      out[key] = value
  return out


def _timm_attention(layer: str, name: str, value: np.ndarray, num_heads: Optional[int]) -> Flat:
  if not num_heads:
    raise ValueError("a timm checkpoint does not store the number of heads: "
                     "set config.model.num_heads")
  prefix = f"Transformer/encoderblock_{layer}/MultiHeadDotProductAttention_0"
  if name == "attn.proj.weight":  # (D, D) -> (heads, head_dim, D)
    d = value.shape[0]
    return {f"{prefix}/out/kernel": value.T.reshape(num_heads, d // num_heads, d)}
  if name == "attn.proj.bias":
    return {f"{prefix}/out/bias": value}
  if value.shape[0] % 3:
    raise ValueError(f"blocks.{layer}.{name} has shape {value.shape}: the fused qkv "
                     f"needs a first axis of 3 x hidden")
  d = value.shape[0] // 3
  if d % num_heads:
    raise ValueError(f"hidden size {d} of blocks.{layer}.{name} is not divisible by "
                     f"config.model.num_heads={num_heads}")
  out = {}
  for part, chunk in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
    if name == "attn.qkv.weight":  # (D_out, D_in) -> (D_in, heads, head_dim)
      out[f"{prefix}/{part}/kernel"] = chunk.T.reshape(chunk.shape[1], num_heads, d // num_heads)
    elif name == "attn.qkv.bias":
      out[f"{prefix}/{part}/bias"] = chunk.reshape(num_heads, d // num_heads)
    else:
      out[f"blocks.{layer}.{name}"] = value
  return out


def to_ours(flat: Flat, fmt: str, num_heads: Optional[int]) -> Flat:
  """Converts `flat` from format `fmt` to our names and layouts."""
  if fmt == VIT_JAX:
    return from_vit_jax(flat)
  if fmt == BIG_VISION:
    return from_big_vision(flat)
  if fmt == TIMM:
    return from_timm(flat, num_heads)
  raise ValueError(f"unknown checkpoint format {fmt!r}; known: {[VIT_JAX, BIG_VISION, TIMM]}")
