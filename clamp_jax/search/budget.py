"""The mixed-precision budget: model size (params x w_bits) and BOPs (MACs x w_bits x a_bits
over the weight matmuls) of a ViT's or Swin's `QuantParams`, or of a foreign model's
(`models.intercept`), relative to a uniform model (by default W4/A8,
`config.quant.budget_w_bits` / `budget_a_bits`); reports are relative to W4/A8.

Costs are sums of integers computed on the host in float64, where they are exact, so "within
budget" is an exact comparison. Arrays may carry a leading population axis `[K]` (a block's
population placed into the model with `with_block`); the costs then carry it too.
"""

import dataclasses
import re
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from clamp_jax.quant.params import WEIGHT, SiteQuant, flatten

REFERENCE_BITS = (4, 8)  # (weights, activations) of the model reports are relative to
KINDS = {"size": [0], "bops": [1], "both": [0, 1]}  # config.quant.budget_kind -> counted costs

# The activation site each kernel's matmul reads, and whether it reads every token of it
# (the heads read one pooled vector per image): the first row whose kernel pattern matches and
# whose input site is quantized. A kernel reading a float input (the patch embedding with
# config.quant.image_bits=0) counts in size, not in BOPs.
MATMULS = (
    (r"(.*)/MultiHeadDotProductAttention_0/(query|key|value)/kernel", r"\1/ln1", True),
    (r"(.*/MultiHeadDotProductAttention_0)/out/kernel", r"\1/attn_v", True),
    (r"(.*)/MlpBlock_0/Dense_0/kernel", r"\1/ln2", True),
    (r"(.*/MlpBlock_0)/Dense_1/kernel", r"\1/gelu", True),
    (r"(.*/downsample_\d+)/reduction/kernel", r"\1/merge_ln", True),  # Swin's patch merging
    (r"embedding/kernel", "image", True),
    (r"pre_logits/kernel", "head_in", False),
    (r"pre_logits/kernel", "Transformer/encoder_norm_out", False),
    (r"head/kernel", "pre_logits_out", False),
    (r"head/kernel", "head_in", False),
    (r"head/kernel", "Transformer/encoder_norm_out", False),
    # A foreign model's layer (each input element read once: dense layers, patch convs).
    (r"(.*)/kernel", r"\1/input", True),
)


def matmul_input(path: str, sites: dict):
  """`(input site, reads every token)` of kernel `path`, or None (float input or no match)."""
  for pattern, source, every_token in MATMULS:
    match = re.fullmatch(pattern, path)
    if match and match.expand(source) in sites:
      return match.expand(source), every_token
  return None


def searched(path: str, site: SiteQuant) -> bool:
  """Whether mixed precision moves site `path`: a site whose own `bit_range` spans more than one
  width (a foreign model's), else a block's site (our models')."""
  if site.bit_range is not None:
    return site.bit_range[0] < site.bit_range[1]
  return "/encoderblock_" in path


@dataclasses.dataclass(frozen=True)
class Matmul:
  """One weight matmul: its kernel site, that site's parameter count, the activation site it
  reads (None: a float input, counted in size only) and its MACs per image."""
  kernel: str
  params: int
  source: Optional[str]
  macs: int

  def cost(self, bits_of: Callable[[str], Any]) -> Tuple[Any, Any]:
    """`(size, BOPs)` with each site at `bits_of(path)` (a float input: no BOPs)."""
    w_bits = bits_of(self.kernel)
    return self.params * w_bits, self.macs * w_bits * bits_of(self.source) if self.source else 0.0


def matmuls(sites: Dict[str, SiteQuant]) -> List[Matmul]:
  """The weight matmuls of the flat `sites` (`flatten(qparams)`), as the budget counts them."""
  out = []
  for path, site in sites.items():
    if site.kind != WEIGHT:
      continue
    found = matmul_input(path, sites)
    source, macs = None, 0
    if found:
      source, every_token = found
      # MACs = tokens x in x out, with tokens = input elements / in = input elements x out / numel;
      # out: the output channels, one scale each (per candidate of a population).
      out_channels = site.scale.size // np.size(site.bits)
      macs = (sites[source].numel * out_channels // site.numel if every_token else 1) * site.numel
    out.append(Matmul(path, site.numel, source, macs))
  return out


def counted(qparams) -> set:
  """The paths of the sites the budget counts: every weight site and the activations a weight
  matmul reads (not q, k, v and the softmax probabilities, whose matmuls have no weight)."""
  terms = matmuls(flatten(qparams))
  return {m.kernel for m in terms} | {m.source for m in terms if m.source}


def costs(qparams, bits=None, searched_only: bool = False) -> np.ndarray:
  """`[..., 2]`: size and BOPs per image; with `bits=(w, a)`, as if every site (with
  `searched_only`, every site mixed precision moves; the others as they are) had those bits."""
  sites = flatten(qparams)

  def bits_of(path):
    site = sites[path]
    if bits is not None and (searched(path, site) or not searched_only):
      return float(bits[0] if site.kind == WEIGHT else bits[1])
    return np.asarray(site.bits, np.float64)

  size = bops = 0.0
  for m in matmuls(sites):
    m_size, m_bops = m.cost(bits_of)
    size, bops = size + m_size, bops + m_bops
  return np.stack(np.broadcast_arrays(size, bops), axis=-1)


def report(qparams) -> dict:
  """`size_vs_w4a8`, `bops_vs_w4a8`: the costs relative to the same sites at uniform W4/A8."""
  relative = costs(qparams) / costs(qparams, REFERENCE_BITS)
  return dict(size_vs_w4a8=float(relative[0]), bops_vs_w4a8=float(relative[1]))


@dataclasses.dataclass(frozen=True)
class Budget:
  """At most `limit` times the uniform reference model's cost, in the costs `kind` counts."""
  reference: np.ndarray  # [2]: costs of the uniform reference model
  limit: float
  kind: str

  @classmethod
  def of(cls, qparams, limit: float, kind: str, bits=REFERENCE_BITS) -> "Budget":
    """The budget relative to `qparams` with every searched site at `bits` `(w, a)` (the sites
    the search does not move, outside the blocks or of a fixed width, as they are)."""
    return cls(costs(qparams, bits, searched_only=True), limit, kind)

  @classmethod
  def from_config(cls, qparams, quant_cfg) -> "Budget":
    """The budget `config.quant` asks for."""
    return cls.of(qparams, quant_cfg.budget, quant_cfg.budget_kind,
                  (quant_cfg.budget_w_bits, quant_cfg.budget_a_bits))

  def allows(self, qparams) -> np.ndarray:
    """Whether `qparams` (each candidate, with a population axis) meets the budget."""
    counted = KINDS[self.kind]
    return np.all(costs(qparams)[..., counted] <= self.limit * self.reference[counted], axis=-1)
