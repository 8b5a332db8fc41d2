"""The block protocol the search, the budget, the reconstruction and the generator rely on.

A model (`VisionTransformer`, `SwinTransformer`) implements:
- `num_layers`: the number of blocks, numbered 0.. in forward order (the search visits them);
- `block_grids(image_size)`: each block's `BlockGrid`: the 2-D grid of its patch tokens (raster
  order) and how many other tokens precede them (a class token);
- `apply(v, x, return_intermediates=True)` -> `(logits, {"block_in", "attn", "block"})`, each
  indexed by block (`[l]`: `[B, N_l, D_l]`): a stacked `[L, B, N, D]` array (the ViT) or a tuple
  (the Swin, whose token count and width change between stages);
- `apply(v, block_in, start_block=l)`: blocks `l..L-1` and the head from the stream entering
  block `l`;
- block `i`'s parameters and quantization sites under `Transformer/encoderblock_{i}`
  (`block_name`); the rest of the model is not searched.
Optionally, where every block is the same module (the ViT): `block_module()`, one block as a
module of its own, and `apply(v, x, start_block=L)`, the head alone; the search then scores
every block with one program (`search/evaluator.py`).
"""

import re
from typing import List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

ENCODER = "Transformer"  # the module holding the blocks


class BlockGrid(NamedTuple):
  """A block's token layout: `prefix` tokens (a class token), then a `grid` of patch tokens."""
  grid: Tuple[int, int]
  prefix: int = 0


def block_name(block: int) -> str:
  """The name of block `block`'s module under `ENCODER`."""
  return f"encoderblock_{block}"


def block_index(name: str) -> Optional[int]:
  """The block number of a module called `name`, or None when it is no block."""
  match = re.fullmatch(r"encoderblock_(\d+)", name or "")
  return int(match.group(1)) if match else None


def same_grid_runs(grids: Sequence[BlockGrid]) -> List[Tuple[int, int]]:
  """`[(start, stop)]`: the runs of consecutive blocks that share a `BlockGrid`, in order."""
  runs = []
  for i, grid in enumerate(grids):
    if runs and grids[runs[-1][0]] == grid:
      runs[-1] = (runs[-1][0], i + 1)
    else:
      runs.append((i, i + 1))
  return runs


def per_grid(fn, grids: Sequence[BlockGrid], *per_block) -> jax.Array:
  """`[L]`: `fn(grid, *stacks)` of each run of blocks sharing a grid, `vmap`ped over the run's
  blocks (`per_block` sequences indexed by block, stacked run by run), concatenated in block
  order."""
  out = []
  for start, stop in same_grid_runs(grids):
    stacks = [jnp.stack([seq[i] for i in range(start, stop)]) for seq in per_block]
    out.append(jax.vmap(lambda *xs, g=grids[start]: fn(g, *xs))(*stacks))
  return jnp.concatenate(out)
