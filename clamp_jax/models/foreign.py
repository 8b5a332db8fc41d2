"""A linen ViT classifier we did not write, seen through the part of the block protocol
(`models/protocol.py`) that the generator reads, so `generate` runs on it unchanged.

    vit = ForeignViT(model, blocks=r"blocks_\\d+/attn", output_fn=lambda out: out.logits)
    images, targets, state, report = generate(config, vit, variables["params"], qparams)

The blocks' tokens are the outputs of the modules `blocks` picks, in the order the model calls
them; the quantized model Q is the model under `apply_quantized_layers` with `qparams` (from
`calibrate_layers`).
"""

import dataclasses
import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from clamp_jax.models.intercept import OutputFn, apply_quantized_layers, logits_of
from clamp_jax.models.protocol import BlockGrid

# Module paths (regexes matching the whole path) or a flax `capture_intermediates` filter.
BlockFilter = Union[str, Sequence[str], Callable[[nn.Module, str], bool]]


@dataclasses.dataclass(frozen=True, eq=False)
class ForeignViT:
  """`model` with `block_grids` and `apply(..., return_intermediates=True)` of the protocol.

  `blocks`: the modules whose output is a block's tokens for the generator's losses (CLAMP's
  patch contrast and PSAQ's patch similarity entropy both read the attention output before the
  residual, `[B, N, D]` or `[B, H, W, D]`; of a tuple output, the first array): a regex or a
  list of regexes matching the whole module path (`"blocks_0/attn"`), or a
  `capture_intermediates` filter `(module, method_name) -> bool`. `prefix`: the tokens before
  the patches (a class token: 1); the patches form a square grid in raster order.
  `output_fn` reads the logits from what `model.apply` returns; `channels` are the images'
  (for the shapes only); `apply_kwargs` go to every `model.apply`. Compare by identity: reuse
  one instance, `generate` compiles its step once per instance.
  """
  model: nn.Module
  blocks: BlockFilter
  output_fn: Optional[OutputFn] = None
  prefix: int = 0
  channels: int = 3
  apply_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def capture(self, module: nn.Module, method_name: str) -> bool:
    """Whether `capture_intermediates` records this call's output as a block's tokens."""
    if callable(self.blocks):
      return self.blocks(module, method_name)
    patterns = [self.blocks] if isinstance(self.blocks, str) else self.blocks
    path = "/".join(str(p) for p in module.path)
    return method_name == "__call__" and any(re.fullmatch(p, path) for p in patterns)

  def apply(self, variables: dict, images: jax.Array, return_intermediates: bool = False):
    """The logits, and with `return_intermediates` `{"attn": tokens}` (a tuple, one
    `[B, N, D]` per block); a `"quant"` collection in `variables` quantizes the model with it."""
    variables = dict(variables)
    qparams = variables.pop("quant", {})
    out, state = apply_quantized_layers(self.model, variables, qparams, images,
                                        capture_intermediates=self.capture,
                                        mutable="intermediates", **self.apply_kwargs)
    logits = logits_of(out, self.output_fn)
    if not return_intermediates:
      return logits
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state.get("intermediates", {})))
    tokens = [jax.tree_util.tree_leaves(value)[0] for key, values in flat.items()
              if key[-1] == "__call__" for value in values]
    if not tokens:
      raise ValueError(f"ForeignViT.blocks={self.blocks!r} picked no module of "
                       f"{type(self.model).__name__}")
    return logits, {"attn": tuple(t.reshape(t.shape[0], -1, t.shape[-1]) for t in tokens)}

  def block_grids(self, image_size: int) -> List[BlockGrid]:
    """Each block's `BlockGrid`: `prefix`, then a square grid of the remaining tokens."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, self.channels), jnp.float32)
    variables = jax.eval_shape(lambda x: self.model.init(jax.random.PRNGKey(0), x,
                                                         **self.apply_kwargs), x)
    _, inter = jax.eval_shape(lambda v, x: self.apply(v, x, return_intermediates=True),
                              variables, x)
    grids = []
    for tokens in inter["attn"]:
      side = math.isqrt(tokens.shape[1] - self.prefix)
      if side * side != tokens.shape[1] - self.prefix:
        raise ValueError(f"a block's {tokens.shape[1]} tokens less prefix={self.prefix} do not "
                         f"form a square grid")
      grids.append(BlockGrid((side, side), self.prefix))
    return grids
