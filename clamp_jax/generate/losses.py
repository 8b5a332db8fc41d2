"""Losses of the data generator: patch-contrastive (CLAMP-ViT L_C1), PSAQ-ViT's patch similarity
entropy, total variation and the target-class cross-entropy. Pure and vectorised.

Token tensors are `[B, gh * gw, D]` with the CLS token already dropped (`drop_prefix`); patches
are in row-major order on the `grid = (gh, gw)`. The per-model losses (`blocks_*`) take each
block's tokens and `BlockGrid` (`models/protocol.py`), so every block is read on its own grid.
"""

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clamp_jax.models.protocol import BlockGrid, per_grid


def drop_prefix(tokens: jax.Array, prefix: int) -> jax.Array:
  """`tokens[..., N, D]` without the `prefix` tokens before the patches (a class token)."""
  return tokens[..., prefix:, :]


def _unit(x: jax.Array) -> jax.Array:
  """`x` scaled to unit L2 norm on the last axis (finite gradient at 0)."""
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def neighbourhood(grid: Tuple[int, int], k: int = 3) -> Tuple[np.ndarray, np.ndarray]:
  """Each patch's k x k spatial neighbours, itself excluded.

  Returns `(index, valid)`, both `[gh * gw, k * k - 1]`: `index[n, m]` is the row-major patch
  index of neighbour `m` of patch `n` (offsets in row-major order), `valid[n, m]` whether that
  neighbour lies inside the grid. Invalid entries point at the patch itself, so a gather stays
  in bounds; they must be masked out with `valid`.
  """
  if k < 3 or k % 2 == 0:
    raise ValueError(f"neighbourhood size k={k} must be odd and at least 3")
  gh, gw = grid
  r = k // 2
  offsets = np.array([(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                      if (dy, dx) != (0, 0)])
  y, x = np.divmod(np.arange(gh * gw), gw)
  ny = y[:, None] + offsets[None, :, 0]
  nx = x[:, None] + offsets[None, :, 1]
  valid = (ny >= 0) & (ny < gh) & (nx >= 0) & (nx < gw)
  index = np.where(valid, ny * gw + nx, np.arange(gh * gw)[:, None])
  return index.astype(np.int32), valid


def contrastive_terms(anchor_tokens: jax.Array, candidate_tokens: jax.Array,
                      grid: Tuple[int, int], k: int = 3, positives: int = 4,
                      tau: float = 0.1) -> Tuple[jax.Array, np.ndarray]:
  """Per-anchor InfoNCE terms of `patch_contrastive_loss`: `(loss [B, N], counted [N])`.

  Anchor n (from `anchor_tokens`) is compared by cosine similarity with the valid neighbours of
  patch n in `candidate_tokens`. Its positives are the `min(positives, n_valid - 1)` most similar
  valid neighbours (so at least one negative remains, e.g. 2 of the 3 at a corner; ties go to the
  earlier neighbour), its negatives the other valid neighbours:
  `loss = -log(sum_pos exp(sim / tau) / sum_valid exp(sim / tau))`.
  `counted` is False for anchors with fewer than 2 valid neighbours (only on grids one patch
  wide), which have no negative; their loss is 0 and they are left out of the mean.
  """
  if positives < 1:
    raise ValueError(f"positives={positives} must be at least 1")
  if tau <= 0:
    raise ValueError(f"tau={tau} must be positive")
  n = grid[0] * grid[1]
  if anchor_tokens.shape[-2] != n or candidate_tokens.shape[-2] != n:
    raise ValueError(f"tokens {anchor_tokens.shape} / {candidate_tokens.shape} do not have "
                     f"{n} patches of a {grid[0]}x{grid[1]} grid (drop the CLS token first)")
  index, valid = neighbourhood(grid, k)
  n_valid = valid.sum(axis=1)
  counted = n_valid >= 2
  if not counted.any():
    raise ValueError(f"a {grid[0]}x{grid[1]} grid has no patch with two neighbours")
  n_pos = np.maximum(np.minimum(positives, n_valid - 1), 1)

  sim_all = jnp.einsum("bnd,bmd->bnm", _unit(anchor_tokens), _unit(candidate_tokens))
  sim = jnp.take_along_axis(sim_all, jnp.asarray(index)[None], axis=2)  # [B, N, k*k-1]
  masked = jnp.where(valid, sim, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-masked, axis=-1, stable=True), axis=-1)  # 0 = most similar
  is_pos = valid & (rank < n_pos[:, None])
  logits = sim / tau
  log_all = jax.nn.logsumexp(jnp.where(valid, logits, -jnp.inf), axis=-1)
  log_pos = jax.nn.logsumexp(jnp.where(is_pos, logits, -jnp.inf), axis=-1)
  return log_all - log_pos, counted


def patch_contrastive_loss(anchor_tokens: jax.Array, candidate_tokens: jax.Array,
                           grid: Tuple[int, int], k: int = 3, positives: int = 4,
                           tau: float = 0.1) -> jax.Array:
  """CLAMP-ViT's patch-level contrastive loss L_C1 for one block, averaged over anchors and images.

  `anchor_tokens` come from the quantized model Q, `candidate_tokens` from the float model P,
  both `[B, gh * gw, D]`; see `contrastive_terms` for the positives and negatives.
  """
  terms, counted = contrastive_terms(anchor_tokens, candidate_tokens, grid, k, positives, tau)
  return jnp.sum(terms * counted, axis=-1).mean() / counted.sum()


def blocks_contrastive_loss(anchors, candidates, grids: Sequence[BlockGrid], k: int = 3,
                            positives: int = 4, tau: float = 0.1) -> jax.Array:
  """`patch_contrastive_loss` of every block on its own grid, averaged over the blocks.

  `anchors`, `candidates`: per-block tokens (indexed by block: `[B, N_l, D_l]`); `grids`: each
  block's `BlockGrid` (the model's `block_grids`), whose prefix tokens are dropped.
  """
  def one(g: BlockGrid, a, c):
    return patch_contrastive_loss(drop_prefix(a, g.prefix), drop_prefix(c, g.prefix), g.grid, k,
                                  positives, tau)
  return per_grid(one, grids, anchors, candidates).mean()


def blocks_similarity_entropy(tokens, grids: Sequence[BlockGrid]) -> jax.Array:
  """`patch_similarity_entropy` of every block's patch tokens, summed over the blocks."""
  return per_grid(lambda g, t: patch_similarity_entropy(drop_prefix(t, g.prefix)), grids,
                  tokens).sum()


def patch_similarity_entropy(tokens: jax.Array, bandwidth: float = 0.01,
                             points: int = 10) -> jax.Array:
  """PSAQ-ViT's patch similarity entropy of one block's patch features `[B, N, D]`, image mean.

  Per image: the `N x N` cosine-similarity matrix (all entries, diagonal included), a Gaussian
  kernel density estimate with `bandwidth` evaluated at `points` evenly spaced values between that
  image's smallest and largest similarity (the evaluation points carry no gradient), and the
  differential entropy `-integral p log p` by the trapezoid rule. Larger = more diverse patches.
  """
  u = _unit(tokens)
  sims = jnp.einsum("bnd,bmd->bnm", u, u).reshape(tokens.shape[0], -1)  # [B, N * N]
  lo = jax.lax.stop_gradient(sims.min(axis=1))
  hi = jax.lax.stop_gradient(sims.max(axis=1))
  xs = lo[:, None] + (hi - lo)[:, None] * jnp.linspace(0.0, 1.0, points)  # [B, points]
  z = (xs[:, :, None] - sims[:, None, :]) / bandwidth
  density = jnp.mean(jnp.exp(-0.5 * z * z), axis=-1) / (bandwidth * np.sqrt(2 * np.pi))
  integrand = -density * jnp.log(density + 1e-12)
  entropy = jnp.sum(0.5 * (integrand[:, 1:] + integrand[:, :-1]) * jnp.diff(xs, axis=1), axis=1)
  return entropy.mean()


def total_variation(images: jax.Array) -> jax.Array:
  """Anisotropic L1 total variation of `[B, H, W, C]` images, normalised by the number of pixels.

  The mean absolute difference of vertical neighbours plus that of horizontal neighbours; so a
  value does not depend on the image size, and a constant image scores 0.
  """
  dy = jnp.abs(images[:, 1:] - images[:, :-1]).mean()
  dx = jnp.abs(images[:, :, 1:] - images[:, :, :-1]).mean()
  return dy + dx


def logits_kl(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """Mean over images of KL(softmax(p_logits) || softmax(q_logits)), `[B, classes]` each."""
  log_p = jax.nn.log_softmax(p_logits)
  return jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(q_logits)), axis=-1).mean()


def target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of `logits [B, classes]` against integer `targets [B]`."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
