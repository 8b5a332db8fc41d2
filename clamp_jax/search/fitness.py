"""Fitness of a candidate (lower is better): `L_F = w_block * L_C2 + w_output * L_O`.

L_C2 (block-local contrastive): each quantized block-output token is an anchor, the FP token
of the same image and position its positive, the other sampled FP tokens its negatives.
L_O (output): InfoNCE over the batch between quantized and FP logits, or KL(FP || Q).
Both InfoNCE terms use Evol-Q's form: cosine similarities over a temperature T, the
cross-entropy scaled by 2T.
"""

import jax
import jax.numpy as jnp
import ml_collections

OUTPUT_LOSSES = ("contrastive", "kl")


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


def output_loss(q_logits: jax.Array, fp_logits: jax.Array, kind: str,
                temperature: float) -> jax.Array:
  if kind == "contrastive":
    return info_nce(q_logits, fp_logits, temperature)
  if kind == "kl":
    log_p = jax.nn.log_softmax(fp_logits)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(q_logits)), axis=-1))
  raise ValueError(f"unknown config.search.output_loss={kind!r}; known: {OUTPUT_LOSSES}")


def fitness(cfg: ml_collections.ConfigDict, q_block: jax.Array, fp_block: jax.Array,
            q_logits: jax.Array, fp_logits: jax.Array, token_sample: jax.Array) -> jax.Array:
  """`L_F` of one candidate from its block output and logits, against the FP targets."""
  total = jnp.zeros((), jnp.float32)
  if cfg.w_block:
    total += cfg.w_block * block_contrastive(q_block, fp_block, token_sample, cfg.temperature)
  if cfg.w_output:
    total += cfg.w_output * output_loss(q_logits, fp_logits, cfg.output_loss, cfg.temperature)
  return total
