"""Flax ViT / DeiT with the parameter names of vision_transformer and big_vision.

Every matmul weight passes through `quant_site(module, "kernel", w)` and every
activation that feeds a matmul (or is listed as a quantization site in
ALGORITHM.md) through `quant_site(module, NAME, x)`. These calls are the single
place where quantization plugs in, so the quantized model is this model, not a copy.
"""

from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clamp_jax.models.protocol import BlockGrid, block_name


COMPUTE_DTYPES = ("float32", "bfloat16")  # `config.model.compute_dtype`
QUANT = "quant"  # collection of `SiteQuant` parameters (a `QuantParams` tree)
OBSERVE = "quant_observe"  # mutable collection that records every site's value (calibration)


def quant_site(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
  """Quantization hook for the value `x` at site `name` of `module`.

  Records `x` when the `OBSERVE` collection is mutable; fake-quantizes it when the `QUANT`
  collection holds a `SiteQuant` for this site; otherwise returns `x` unchanged, so the
  model without `QuantParams` is exactly the float model.
  """
  if module.is_mutable_collection(OBSERVE) and not module.is_initializing():
    module.sow(OBSERVE, name, x)
  if module.has_variable(QUANT, name):
    return module.get_variable(QUANT, name)(x)
  return x


def compute_dtype(model_cfg) -> Any:
  """The jnp dtype `config.model.compute_dtype` names ("float32" when the section has none)."""
  name = model_cfg.get("compute_dtype", "float32")
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.model.compute_dtype={name!r}; known: {list(COMPUTE_DTYPES)}")
  return jnp.dtype(name)


def float32_accumulation(compute_dtype: Any) -> dict:
  """The keyword a matmul takes to accumulate and return float32 from `compute_dtype` operands;
  none for float32, so a float32 matmul stays exactly what it was (a qwix kernel included)."""
  return {} if jnp.dtype(compute_dtype) == jnp.float32 else dict(
      preferred_element_type=jnp.float32)


def cast(x: jax.Array, compute_dtype: Any) -> jax.Array:
  """`x` as a matmul operand in `compute_dtype` (float32: `x` itself)."""
  return x if jnp.dtype(compute_dtype) == jnp.float32 else x.astype(compute_dtype)


def matmul(spec: str, a: jax.Array, b: jax.Array, compute_dtype: Any) -> jax.Array:
  """`einsum(spec, a, b)` with both operands in `compute_dtype`, accumulated and returned in
  float32, so the quantizers around every matmul stay float32."""
  return jnp.einsum(spec, cast(a, compute_dtype), cast(b, compute_dtype),
                    **float32_accumulation(compute_dtype))


def _quant_kernel(module: nn.Module, kernel: jax.Array, in_axes: int) -> jax.Array:
  """The kernel passes its site as a 2-D `(inputs, outputs)` view: per-output-channel is axis 1.

  A kernel whose site is neither observed nor quantized is returned as it is, so a qwix PTQ
  kernel (which refuses reshapes) reaches the matmul untouched (`clamp_jax/qwix_export.py`).
  """
  if not (module.has_variable(QUANT, "kernel") or module.is_mutable_collection(OBSERVE)):
    return kernel
  n_in = int(np.prod(kernel.shape[:in_axes]))
  return quant_site(module, "kernel", kernel.reshape(n_in, -1)).reshape(kernel.shape)


class Projection(nn.Module):
  """A dense layer over the last `in_axes` axes (flax `DenseGeneral` layout).

  kernel: `in_shape + features`, bias: `features` (none when `use_bias` is False). The kernel
  is a quantization site.
  """
  features: Union[int, Sequence[int]]
  in_axes: int = 1
  kernel_init: nn.initializers.Initializer = None
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  use_bias: bool = True
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[x.ndim - self.in_axes:]
    kernel_shape = tuple(in_shape) + features
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_avg", "uniform",
        in_axis=tuple(range(self.in_axes)),
        out_axis=tuple(range(self.in_axes, len(kernel_shape))))
    kernel = self.param("kernel", init, kernel_shape, jnp.float32)
    bias = self.param("bias", self.bias_init, features, jnp.float32) if self.use_bias else None
    kernel = _quant_kernel(self, kernel, len(in_shape))
    contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
    cd = self.compute_dtype
    y = jax.lax.dot_general(cast(x, cd), cast(kernel, cd), (contract, ((), ())),
                            **float32_accumulation(cd))
    return y if bias is None else y + bias


class PatchEmbedding(nn.Module):
  """Non-overlapping patch embedding; kernel `(p, p, C, D)` like the conv of vision_transformer."""
  hidden_size: int
  patch_size: int
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    b, h, w, c = images.shape
    gh, gw = h // p, w // p
    if gh == 0 or gw == 0:
      raise ValueError(f"image {h}x{w} is smaller than the patch size {p}")
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                        (p, p, c, self.hidden_size), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.hidden_size,), jnp.float32)
    kernel = _quant_kernel(self, kernel, 3)
    x = images[:, :gh * p, :gw * p, :].reshape(b, gh, p, gw, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # b, gh, gw, p, p, c: the kernel's (kh, kw, cin) order
    y = matmul("bijklc,klcd->bijd", x, kernel, self.compute_dtype)
    return y + bias


def project_qkv(module: nn.Module, x: jax.Array, num_heads: int, compute_dtype: Any):
  """`(q, k, v)`, each `[..., N, heads, head_dim]`: `module`'s `query`, `key`, `value`
  projections of `x` through their sites. Called inside `module`'s compact `__call__`."""
  d = x.shape[-1]
  if d % num_heads:
    raise ValueError(f"hidden size {d} is not divisible by num_heads={num_heads}")
  shape = (num_heads, d // num_heads)
  proj = lambda name: Projection(shape, compute_dtype=compute_dtype, name=name)(x)
  return tuple(quant_site(module, site, proj(name))
               for site, name in (("q", "query"), ("k", "key"), ("v", "value")))


def attention_output(module: nn.Module, logits: jax.Array, v: jax.Array,
                     compute_dtype: Any) -> jax.Array:
  """The attention's output from the softmax input `logits` `[..., heads, N, N]`: softmax,
  x `v`, `module`'s `out` projection, through the sites `attn_logits`, `attn_probs`, `attn_v`
  and `attn_out`. Called inside `module`'s compact `__call__`."""
  logits = quant_site(module, "attn_logits", logits)
  probs = quant_site(module, "attn_probs", jax.nn.softmax(logits, axis=-1))
  attended = quant_site(module, "attn_v", matmul("...hqk,...khd->...qhd", probs, v, compute_dtype))
  out = Projection(v.shape[-2] * v.shape[-1], in_axes=2, compute_dtype=compute_dtype,
                   name="out")(attended)
  return quant_site(module, "attn_out", out)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with `query`, `key`, `value`, `out` projections as in flax/vision_transformer."""
  num_heads: int
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cd = self.compute_dtype
    q, k, v = project_qkv(self, x, self.num_heads, cd)
    logits = matmul("...qhd,...khd->...hqk", q, k, cd) / np.sqrt(q.shape[-1]).astype(np.float32)
    return attention_output(self, logits, v, cd)


class MlpBlock(nn.Module):
  """fc1 -> GELU -> fc2, named `Dense_0` and `Dense_1`."""
  mlp_dim: int
  gelu_approximate: bool = False
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Projection(self.mlp_dim, compute_dtype=self.compute_dtype, name="Dense_0")(x)
    h = quant_site(self, "gelu", nn.gelu(h, approximate=self.gelu_approximate))
    out = Projection(x.shape[-1], compute_dtype=self.compute_dtype, name="Dense_1")(h)
    return quant_site(self, "fc2", out)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block. Returns `(block_output, attention_output_before_residual)`."""
  mlp_dim: int
  num_heads: int
  layernorm_epsilon: float = 1e-6
  gelu_approximate: bool = False
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array):
    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="LayerNorm_0")(x)
    y = quant_site(self, "ln1", y)
    attn = MultiHeadDotProductAttention(self.num_heads, self.compute_dtype,
                                        name="MultiHeadDotProductAttention_0")(y)
    x = quant_site(self, "residual1", x + attn)
    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="LayerNorm_1")(x)
    y = quant_site(self, "ln2", y)
    y = MlpBlock(self.mlp_dim, self.gelu_approximate, self.compute_dtype, name="MlpBlock_0")(y)
    return quant_site(self, "residual2", x + y), attn


class Encoder(nn.Module):
  """Position embedding, `num_layers` blocks and the final LayerNorm (`Transformer/...`)."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  layernorm_epsilon: float = 1e-6
  gelu_approximate: bool = False
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, return_intermediates: bool = False,
               start_block: Optional[int] = None):
    """Tokens -> encoded tokens. With `start_block` set, `x` is the residual stream entering
    that block, and the position embedding and the blocks before it are skipped."""
    if start_block is None:
      pos = PositionEmbedding(name="posembed_input")(x)
      x = quant_site(self, "posembed", x + pos)
    block_inputs, attn_outputs, block_outputs = [], [], []
    for i in range(start_block or 0, self.num_layers):
      block_inputs.append(x)
      x, attn = Encoder1DBlock(self.mlp_dim, self.num_heads, self.layernorm_epsilon,
                               self.gelu_approximate, self.compute_dtype, name=block_name(i))(x)
      attn_outputs.append(attn)
      block_outputs.append(x)
    x = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="encoder_norm")(x)
    x = quant_site(self, "encoder_norm_out", x)
    if not return_intermediates:
      return x, None
    return x, {"block_in": jnp.stack(block_inputs), "attn": jnp.stack(attn_outputs),
               "block": jnp.stack(block_outputs)}


class PositionEmbedding(nn.Module):
  """Learned position embedding `pos_embedding` of shape `(1, tokens, hidden)`."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                      (1,) + x.shape[1:], jnp.float32)


class VisionTransformer(nn.Module):
  """ViT / DeiT classifier. `pool`: "tok" (class token) or "gap" (mean of the patch tokens)."""
  num_classes: int
  patch_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  pool: str = "tok"
  representation_size: Optional[int] = None
  layernorm_epsilon: float = 1e-6
  gelu_approximate: bool = False
  compute_dtype: Any = jnp.float32  # the matmuls' operands (`matmul`); all else float32

  @nn.compact
  def __call__(self, inputs: jax.Array, return_intermediates: bool = False,
               start_block: Optional[int] = None):
    """Logits `[B, classes]` of images `inputs` `[B, H, W, C]`.

    With `return_intermediates`, also a dict of stacked per-block tensors, each
    `[L, B, N, D]`: "block_in" (the residual stream entering the block), "attn" (the
    attention output before the residual) and "block" (the block output).
    With `start_block` set (0 included), `inputs` is instead the residual stream `[B, N, D]`
    entering that block (its "block_in"), and only blocks `start_block..L-1` and the head
    run (intermediates cover those blocks): what a block-wise search needs. `start_block` =
    `num_layers`: only the final LayerNorm and the head (no intermediates).
    """
    if self.pool not in ("tok", "gap"):
      raise ValueError(f"pool must be 'tok' or 'gap', got {self.pool!r}")
    if start_block is not None and not 0 <= start_block <= self.num_layers:
      raise ValueError(f"start_block={start_block} outside 0..{self.num_layers}")
    if start_block == self.num_layers and return_intermediates:
      raise ValueError(f"start_block={start_block} runs no block, so it has no intermediates")
    x = self._tokens(inputs) if start_block is None else inputs
    x, intermediates = Encoder(self.num_layers, self.mlp_dim, self.num_heads,
                               self.layernorm_epsilon, self.gelu_approximate, self.compute_dtype,
                               name="Transformer")(x, return_intermediates, start_block)
    x = x[:, 0] if self.pool == "tok" else x.mean(axis=1)
    x = quant_site(self, "head_in", x)  # the pooled features entering pre_logits or the head
    if self.representation_size:
      x = jnp.tanh(Projection(self.representation_size, compute_dtype=self.compute_dtype,
                              name="pre_logits")(x))
      x = quant_site(self, "pre_logits_out", x)
    logits = Projection(self.num_classes, name="head", kernel_init=nn.initializers.zeros,
                        compute_dtype=self.compute_dtype)(x)
    logits = quant_site(self, "logits", logits)
    return (logits, intermediates) if return_intermediates else logits

  def block_module(self) -> Encoder1DBlock:
    """One block as a module of its own: `block_module().apply({"params": params[ENCODER][
    block_name(i)], "quant": ...}, x)` is block `i` (all blocks share the shape)."""
    return Encoder1DBlock(self.mlp_dim, self.num_heads, self.layernorm_epsilon,
                          self.gelu_approximate, self.compute_dtype, parent=None)

  def block_grids(self, image_size: int) -> Tuple[BlockGrid, ...]:
    """Every block's tokens (`models/protocol.py`): the class token, if any, then the patches."""
    side = image_size // self.patch_size
    return (BlockGrid((side, side), 1 if self.pool == "tok" else 0),) * self.num_layers

  def _tokens(self, images: jax.Array) -> jax.Array:
    """Images -> patch tokens, with the class token first when `pool` is "tok"."""
    x = quant_site(self, "image", images)
    x = PatchEmbedding(self.hidden_size, self.patch_size, self.compute_dtype, name="embedding")(x)
    x = quant_site(self, "patch_embed", x)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    if self.pool == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d), jnp.float32)
      x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    return x
