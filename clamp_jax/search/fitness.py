"""Fitness of a candidate (lower is better): `L_F = w_block * block term + w_output * L_O`.

Block terms (`BLOCK_LOSSES`), on block `l`'s output tokens, quantized against FP:
- "contrastive" (L_C2, the paper's): each quantized token is an anchor, the FP token of the same
  image and position its positive, the other sampled FP tokens its negatives;
- "mse": mean squared error; "cosine": mean `1 - cos` of matched tokens;
- "fisher": mean of `F * (O_q - O_fp)^2`, `F = g^2` with `g` the gradient of the FP model's
  cross-entropy to its own argmax label w.r.t. the FP block output, per element (PTQ4ViT, BRECQ).
Output terms (`OUTPUT_LOSSES`), on the logits: "contrastive" (InfoNCE over the batch),
"kl" (KL(FP || Q)) or "mse".
Both InfoNCE terms use Evol-Q's form: cosine similarities over a temperature T, the
cross-entropy scaled by 2T.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

OUTPUT_LOSSES = ("contrastive", "kl", "mse")
BLOCK_LOSSES = ("contrastive", "mse", "cosine", "fisher")


def info_nce(anchors: jax.Array, candidates: jax.Array, temperature: float) -> jax.Array:
  """Row i of `anchors` against all rows of `candidates`, positive = row i; scaled by 2T."""
  a = anchors / (jnp.linalg.norm(anchors, axis=-1, keepdims=True) + 1e-8)
  c = candidates / (jnp.linalg.norm(candidates, axis=-1, keepdims=True) + 1e-8)
  logits = a @ c.T / temperature
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)
  return 2.0 * temperature * nll.mean()


def block_contrastive(q_tokens: jax.Array, fp_tokens: jax.Array, token_sample: jax.Array,
                      temperature: float) -> jax.Array:
  """L_C2 on the tokens `token_sample` (indices into the flattened `[B * N]` tokens)."""
  d = q_tokens.shape[-1]
  return info_nce(q_tokens.reshape(-1, d)[token_sample], fp_tokens.reshape(-1, d)[token_sample],
                  temperature)


def mse(q: jax.Array, fp: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(q - fp))


def cosine_distance(q: jax.Array, fp: jax.Array) -> jax.Array:
  """Mean `1 - cos` of matched rows (last axis)."""
  norms = jnp.linalg.norm(q, axis=-1) * jnp.linalg.norm(fp, axis=-1)
  return jnp.mean(1.0 - jnp.sum(q * fp, axis=-1) / jnp.maximum(norms, 1e-12))


def fisher_mse(q: jax.Array, fp: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean of `weights * (q - fp)^2`, element by element."""
  return jnp.mean(weights * jnp.square(q - fp))


def kl(q_logits: jax.Array, fp_logits: jax.Array) -> jax.Array:
  """KL(FP || Q) of the softmaxes, mean over the batch."""
  log_p = jax.nn.log_softmax(fp_logits)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(q_logits)), axis=-1))


def block_loss(q_tokens: jax.Array, fp_tokens: jax.Array, kind: str, temperature: float,
               token_sample: jax.Array, fisher: Optional[jax.Array] = None) -> jax.Array:
  """The block term `kind` of `[B, N, D]` tokens (`fisher`: `F`, the same shape, for "fisher")."""
  if kind == "contrastive":
    return block_contrastive(q_tokens, fp_tokens, token_sample, temperature)
  if kind == "mse":
    return mse(q_tokens, fp_tokens)
  if kind == "cosine":
    return cosine_distance(q_tokens, fp_tokens)
  if kind == "fisher":
    if fisher is None:
      raise ValueError('block_loss "fisher" needs the Fisher weights (Caches.fisher)')
    return fisher_mse(q_tokens, fp_tokens, fisher)
  raise ValueError(f"unknown config.search.block_loss={kind!r}; known: {BLOCK_LOSSES}")


def output_loss(q_logits: jax.Array, fp_logits: jax.Array, kind: str,
                temperature: float) -> jax.Array:
  if kind == "contrastive":
    return info_nce(q_logits, fp_logits, temperature)
  if kind == "kl":
    return kl(q_logits, fp_logits)
  if kind == "mse":
    return mse(q_logits, fp_logits)
  raise ValueError(f"unknown config.search.output_loss={kind!r}; known: {OUTPUT_LOSSES}")


@dataclasses.dataclass(frozen=True)
class Fitness:
  """`w_block * block_loss + w_output * output_loss`; the defaults are the paper's `L_C2 + L_O`.
  `temperature` is the contrastive terms'. Frozen: static under `jit`."""
  block_loss: str = "contrastive"
  output_loss: str = "contrastive"
  w_block: float = 1.0
  w_output: float = 1.0
  temperature: float = 3.0

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, **fields) -> "Fitness":
    """The fitness of `config.search` (losses, weights, temperature), then `fields`."""
    return cls(**dict(dict(block_loss=cfg.block_loss, output_loss=cfg.output_loss,
                           w_block=cfg.w_block,
                           w_output=cfg.w_output, temperature=cfg.temperature), **fields))

  @property
  def needs_fisher(self) -> bool:
    return bool(self.w_block) and self.block_loss == "fisher"

  def __call__(self, q_block: jax.Array, fp_block: jax.Array, q_logits: jax.Array,
               fp_logits: jax.Array, token_sample: jax.Array,
               fisher: Optional[jax.Array] = None) -> jax.Array:
    """`L_F` of one candidate from its block output and logits, against the FP targets."""
    total = jnp.zeros((), jnp.float32)
    if self.w_block:
      total += self.w_block * block_loss(q_block, fp_block, self.block_loss, self.temperature,
                                         token_sample, fisher)
    if self.w_output:
      total += self.w_output * output_loss(q_logits, fp_logits, self.output_loss,
                                           self.temperature)
    return total

