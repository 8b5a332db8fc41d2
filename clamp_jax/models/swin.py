"""Flax Swin Transformer (shifted-window attention) built from the ViT's pieces.

The forward follows timm's `SwinTransformer` (>= 0.9): conv patch embedding + LayerNorm,
stages of blocks whose attention runs inside `window x window` windows (every second block
of a stage rolls the grid by `-window // 2` first and back after, with the wrapped regions
masked by -100), patch merging (2x2 neighbours, LayerNorm, bias-free linear 4C -> 2C) before
every stage but the first, a final LayerNorm, the mean over tokens and the head.

Parameters and quantization sites carry the ViT's names (`vit.py`): a block is
`Transformer/encoderblock_{i}` (numbered over all stages) with `LayerNorm_0`,
`MultiHeadDotProductAttention_0/{query,key,value,out}` (+ `relative_position_bias_table`),
`LayerNorm_1`, `MlpBlock_0`, so rules written for the ViT's sites apply unchanged. The merge
before stage s is `Transformer/downsample_{s}/{norm,reduction}` with the sites `merge_ln` (the
reduction's input) and `merge_out`. The model implements the block protocol of `protocol.py`.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from clamp_jax.models.protocol import BlockGrid, block_name
from clamp_jax.models.vit import (MlpBlock, PatchEmbedding, Projection, attention_output,
                                  compute_dtype, matmul, project_qkv, quant_site)

Grid = Tuple[int, int]
MASKED = -100.0  # timm's additive mask between tokens of different regions of a shifted window


def stage_window(grid: Grid, window_size: int, shifted: bool) -> Tuple[Grid, Grid]:
  """`(window, shift)` of a block on `grid`: per axis, a grid no larger than the window is one
  window and never shifted (timm's rule); otherwise the window and, in shifted blocks, half of
  it."""
  window = tuple(min(r, window_size) for r in grid)
  shift = tuple(window_size // 2 if shifted and r > window_size else 0 for r in grid)
  return window, shift


def relative_position_index(window: Grid) -> np.ndarray:
  """`[N, N]` rows of the bias table for query i and key j of a window (raster order):
  `(dy + wh - 1) * (2 ww - 1) + dx + ww - 1` with `(dy, dx)` = position i - position j."""
  wh, ww = window
  y, x = np.divmod(np.arange(wh * ww), ww)
  dy, dx = y[:, None] - y[None, :], x[:, None] - x[None, :]
  return (dy + wh - 1) * (2 * ww - 1) + dx + ww - 1


def _partition(x: jax.Array, window: Grid) -> jax.Array:
  """`[B, H, W, C]` -> `[B, windows, wh * ww, C]`: windows, and tokens in each, in raster order."""
  b, h, w, c = x.shape
  wh, ww = window
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def _unpartition(windows: jax.Array, grid: Grid, window: Grid) -> jax.Array:
  """The inverse of `_partition`: `[B, windows, wh * ww, C]` -> `[B, H, W, C]`."""
  b, _, _, c = windows.shape
  (h, w), (wh, ww) = grid, window
  x = windows.reshape(b, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def shifted_window_mask(grid: Grid, window: Grid, shift: Grid) -> Optional[np.ndarray]:
  """`[windows, N, N]`: 0 between tokens of the same region of the rolled grid, -100 otherwise.

  Along an axis of length L rolled by s, the regions are `[0, L - w)`, `[L - w, L - s)` and
  `[L - s, L)`; the last window holds the end of the grid and its wrapped-around start, which
  must not attend to each other. None when nothing is shifted.
  """
  if not any(shift):
    return None
  labels = []
  for length, w, s in zip(grid, window, shift):
    label = np.zeros(length, np.int32)
    if s:
      label[length - w:length - s], label[length - s:] = 1, 2
    labels.append(label)
  region = labels[0][:, None] * 3 + labels[1][None, :]
  region = np.asarray(_partition(region[None, :, :, None], window))[0, :, :, 0]
  return np.where(region[:, :, None] != region[:, None, :], MASKED, 0.0).astype(np.float32)


def merge_neighbours(x: jax.Array) -> jax.Array:
  """`[B, H, W, C]` -> `[B, H/2, W/2, 4C]` (odd sides zero-padded), channels in timm's order:
  the neighbours (0, 0), (1, 0), (0, 1), (1, 1) as (dy, dx)."""
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  h2, w2 = (h + 1) // 2, (w + 1) // 2
  x = x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 4, 2, 5)  # b, i, j, dx, dy, c
  return x.reshape(b, h2, w2, 4 * c)


class WindowAttention(nn.Module):
  """Multi-head attention inside windows, with a learned relative position bias.

  Input `[B, windows, N, D]`; projections as the ViT's attention (`query`, `key`, `value`,
  `out`); `attn_logits` is the softmax input: scaled q.k + bias (+ the shift mask).
  """
  num_heads: int
  window: Grid
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[np.ndarray]) -> jax.Array:
    (wh, ww), n = self.window, x.shape[-2]
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * wh - 1) * (2 * ww - 1), self.num_heads), jnp.float32)
    cd = self.compute_dtype
    q, k, v = project_qkv(self, x, self.num_heads, cd)
    logits = matmul("...qhd,...khd->...hqk", q, k, cd) * np.float32(q.shape[-1] ** -0.5)
    bias = table[relative_position_index(self.window).reshape(-1)].reshape(n, n, -1)
    logits = logits + bias.transpose(2, 0, 1)
    if mask is not None:
      logits = logits + mask[:, None]  # [windows, 1, N, N] against [B, windows, heads, N, N]
    return attention_output(self, logits, v, cd)


class SwinBlock(nn.Module):
  """Pre-LN block with (shifted-)window attention. `x`: `[B, N, D]` in raster order of `grid`.
  Returns `(block_output, attention_output_before_residual)`, both in raster order."""
  mlp_dim: int
  num_heads: int
  window: Grid
  shift: Grid
  layernorm_epsilon: float = 1e-5
  gelu_approximate: bool = False
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid: Grid):
    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="LayerNorm_0")(x)
    y = quant_site(self, "ln1", y)
    attn = self._windowed_attention(y, grid)
    x = quant_site(self, "residual1", x + attn)
    y = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="LayerNorm_1")(x)
    y = quant_site(self, "ln2", y)
    y = MlpBlock(self.mlp_dim, self.gelu_approximate, self.compute_dtype, name="MlpBlock_0")(y)
    return quant_site(self, "residual2", x + y), attn

  def _windowed_attention(self, y: jax.Array, grid: Grid) -> jax.Array:
    """Roll by -shift, zero-pad to whole windows (bottom/right, as timm), attend per window,
    then crop and roll back."""
    b, n, d = y.shape
    h, w = grid
    shifted = any(self.shift)
    x = y.reshape(b, h, w, d)
    x = jnp.roll(x, (-self.shift[0], -self.shift[1]), axis=(1, 2)) if shifted else x
    pad = ((-h) % self.window[0], (-w) % self.window[1])
    x = jnp.pad(x, ((0, 0), (0, pad[0]), (0, pad[1]), (0, 0))) if any(pad) else x
    padded = (h + pad[0], w + pad[1])
    mask = shifted_window_mask(padded, self.window, self.shift)
    out = WindowAttention(self.num_heads, self.window, self.compute_dtype,
                          name="MultiHeadDotProductAttention_0")(_partition(x, self.window), mask)
    x = _unpartition(out, padded, self.window)[:, :h, :w]
    x = jnp.roll(x, self.shift, axis=(1, 2)) if shifted else x
    return x.reshape(b, n, d)


class PatchMerging(nn.Module):
  """2x2 neighbours -> LayerNorm(4C) (`norm`, site `merge_ln`) -> bias-free `reduction` to 2C
  (site `merge_out`, the stream entering the next stage)."""
  layernorm_epsilon: float = 1e-5
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid: Grid):
    b, _, c = x.shape
    x = merge_neighbours(x.reshape(b, grid[0], grid[1], c))
    grid = x.shape[1:3]
    x = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="norm")(x.reshape(b, -1, 4 * c))
    x = quant_site(self, "merge_ln", x)
    x = Projection(2 * c, use_bias=False, compute_dtype=self.compute_dtype, name="reduction")(x)
    return quant_site(self, "merge_out", x), tuple(grid)


def block_stages(depths: Sequence[int]) -> list:
  """`[(stage, index in stage)]` of every block, in forward order (the global block index)."""
  return [(s, j) for s, depth in enumerate(depths) for j in range(depth)]


def stage_grids(grid: Grid, depths: Sequence[int]) -> Tuple[Grid, ...]:
  """Every block's token grid, from the patch grid `grid`: halved (rounding up) by each merge."""
  grids = []
  for s, j in block_stages(depths):
    if j == 0 and s > 0:
      grid = tuple((r + 1) // 2 for r in grid)
    grids.append(grid)
  return tuple(grids)


class SwinEncoder(nn.Module):
  """Stages of blocks with patch merging between them, and the final LayerNorm (`Transformer`)."""
  depths: Tuple[int, ...]
  num_heads: Tuple[int, ...]
  window_size: int
  mlp_ratio: float
  layernorm_epsilon: float = 1e-5
  gelu_approximate: bool = False
  compute_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, grid: Grid, return_intermediates: bool = False,
               start_block: Optional[int] = None):
    """Tokens `[B, N, D]` on `grid` -> encoded tokens of the last stage. With `start_block` set,
    `x` enters that block; the blocks and merges before it are skipped."""
    first = start_block or 0
    stages = block_stages(self.depths)
    inter = {"block_in": [], "attn": [], "block": []}
    for i in range(first, len(stages)):
      s, j = stages[i]
      if j == 0 and s > 0 and i > first:
        x, grid = PatchMerging(self.layernorm_epsilon, self.compute_dtype,
                               name=f"downsample_{s}")(x, grid)
      window, shift = stage_window(grid, self.window_size, shifted=j % 2 == 1)
      inter["block_in"].append(x)
      d = x.shape[-1]
      x, attn = SwinBlock(int(d * self.mlp_ratio), self.num_heads[s], window, shift,
                          self.layernorm_epsilon, self.gelu_approximate, self.compute_dtype,
                          name=block_name(i))(x, grid)
      inter["attn"].append(attn)
      inter["block"].append(x)
    x = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="encoder_norm")(x)
    x = quant_site(self, "encoder_norm_out", x)
    if not return_intermediates:
      return x, None
    return x, {k: tuple(v) for k, v in inter.items()}


class SwinTransformer(nn.Module):
  """Swin classifier (timm's forward; any image size and channel count, read from the input)."""
  num_classes: int
  patch_size: int
  embed_dim: int
  depths: Tuple[int, ...]
  num_heads: Tuple[int, ...]
  window_size: int
  mlp_ratio: float = 4.0
  layernorm_epsilon: float = 1e-5
  gelu_approximate: bool = False
  compute_dtype: Any = jnp.float32  # the matmuls' operands (`vit.matmul`); all else float32

  @nn.compact
  def __call__(self, inputs: jax.Array, return_intermediates: bool = False,
               start_block: Optional[int] = None):
    """Logits `[B, classes]` of images `inputs` `[B, H, W, C]`.

    With `return_intermediates`, also a dict with "block_in" (the residual stream entering each
    block), "attn" (the attention output before the residual) and "block" (the block output).
    Unlike the ViT's, each is a TUPLE of per-block arrays `[B, N_s, D_s]`, not one stacked array:
    the token count and width change from stage to stage. Tokens are in raster order of the
    stage's grid (windows merged back, the shift undone).
    With `start_block=l` (global index over all stages, 0 included), `inputs` is instead the
    stream entering block l: `[B, N_l, D_l]` on a square grid, or `[B, H_l, W_l, D_l]` for any
    grid; the embedding and the blocks and merges before it are skipped.
    """
    self._check(start_block)
    if start_block is None:
      x = quant_site(self, "image", inputs)
      x = PatchEmbedding(self.embed_dim, self.patch_size, self.compute_dtype, name="embedding")(x)
      x = nn.LayerNorm(epsilon=self.layernorm_epsilon, name="embedding_norm")(x)
      x = quant_site(self, "patch_embed", x)  # the residual stream entering block 0
    else:
      x = self._stream(inputs, start_block)
    b, gh, gw, d = x.shape
    x, intermediates = SwinEncoder(
        tuple(self.depths), tuple(self.num_heads), self.window_size, self.mlp_ratio,
        self.layernorm_epsilon, self.gelu_approximate, self.compute_dtype, name="Transformer")(
            x.reshape(b, gh * gw, d), (gh, gw), return_intermediates, start_block)
    x = quant_site(self, "head_in", x.mean(axis=1))
    logits = Projection(self.num_classes, name="head", kernel_init=nn.initializers.zeros,
                        compute_dtype=self.compute_dtype)(x)
    logits = quant_site(self, "logits", logits)
    return (logits, intermediates) if return_intermediates else logits

  @property
  def num_layers(self) -> int:
    """The number of blocks, over all stages."""
    return sum(self.depths)

  def block_grids(self, image_size: int) -> Tuple[BlockGrid, ...]:
    """Every block's token grid (`models/protocol.py`): no class token."""
    side = image_size // self.patch_size
    return tuple(BlockGrid(g) for g in stage_grids((side, side), self.depths))

  def _check(self, start_block: Optional[int]) -> None:
    if len(self.depths) != len(self.num_heads) or not self.depths:
      raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} "
                       f"need one entry per stage")
    total = sum(self.depths)
    if start_block is not None and not 0 <= start_block < total:
      raise ValueError(f"start_block={start_block} outside 0..{total - 1}")

  def _stream(self, x: jax.Array, start_block: int) -> jax.Array:
    """The stream entering `start_block` as `[B, H, W, D]`, its width checked."""
    stage = block_stages(self.depths)[start_block][0]
    width = self.embed_dim * 2 ** stage
    if x.shape[-1] != width:
      raise ValueError(f"block {start_block} (stage {stage}) takes width {width}, got {x.shape}")
    if x.ndim == 4:
      return x
    side = int(round(np.sqrt(x.shape[1])))
    if x.ndim != 3 or side * side != x.shape[1]:
      raise ValueError(f"start_block inputs {x.shape}: expected [B, N, D] on a square grid or "
                       f"[B, H, W, D]")
    return x.reshape(x.shape[0], side, side, width)


def _swin(embed_dim: int, depths: tuple, heads: tuple) -> dict:
  return dict(image_size=224, channels=3, patch_size=4, embed_dim=embed_dim, depths=depths,
              num_heads=heads, window_size=7, mlp_ratio=4.0, num_classes=1000)


SWIN_PRESETS = {
    "Swin-T": _swin(96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "Swin-S": _swin(96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "Swin-B": _swin(128, (2, 2, 18, 2), (4, 8, 16, 32)),
}

# The fields a checkpoint determines; 0 or () in a config means "take it from the checkpoint".
SHAPE_FIELDS = ("channels", "patch_size", "embed_dim", "depths", "num_heads", "window_size",
                "mlp_ratio", "num_classes")


def swin_config(name: str = "", **overrides) -> ml_collections.ConfigDict:
  """A Swin `config.model` section: the preset `name`, then `overrides`.

  Without a preset the shape fields (`SHAPE_FIELDS`) are unset (0 or ()), to be filled from a
  checkpoint by `load_swin_checkpoint`; a set field must agree with the checkpoint.
  """
  if name and name not in SWIN_PRESETS:
    raise ValueError(f"unknown Swin preset {name!r}; known: {sorted(SWIN_PRESETS)}")
  fields = dict(name=name, family="swin", image_size=224, channels=0, patch_size=0, embed_dim=0,
                depths=(), num_heads=(), window_size=0, mlp_ratio=0.0, num_classes=0,
                layernorm_epsilon=1e-5, gelu_approximate=False, compute_dtype="float32",
                checkpoint="", quantized="")
  fields.update(SWIN_PRESETS.get(name, {}))
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f"unknown Swin model fields {sorted(unknown)}; known: {sorted(fields)}")
  fields.update(overrides)
  fields.update(depths=tuple(int(d) for d in fields["depths"]),
                num_heads=tuple(int(h) for h in fields["num_heads"]),
                mlp_ratio=float(fields["mlp_ratio"]))
  return ml_collections.ConfigDict(fields)


def build_swin(cfg: ml_collections.ConfigDict) -> SwinTransformer:
  """The Flax module described by a Swin `config.model` section (its shape fields set)."""
  unset = [f for f in SHAPE_FIELDS if f != "channels" and not cfg[f]]
  if unset:
    raise ValueError(f"Swin config fields {unset} are unset: name a preset "
                     f"({sorted(SWIN_PRESETS)}), set them, or load a checkpoint "
                     f"(load_swin_checkpoint)")
  return SwinTransformer(num_classes=cfg.num_classes, patch_size=cfg.patch_size,
                         embed_dim=cfg.embed_dim, depths=tuple(cfg.depths),
                         num_heads=tuple(cfg.num_heads), window_size=cfg.window_size,
                         mlp_ratio=float(cfg.mlp_ratio), layernorm_epsilon=cfg.layernorm_epsilon,
                         gelu_approximate=cfg.gelu_approximate,
                         compute_dtype=compute_dtype(cfg))
