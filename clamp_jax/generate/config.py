"""The `config.generate` section: defaults (ALGORITHM.md, stage 1) and validation."""

import ml_collections

from clamp_jax.generate.generator import GENERATORS

METHODS = ("clamp", "psaq")


def generate_config(**overrides) -> ml_collections.ConfigDict:
  """A `config.generate` section with its defaults, then `overrides` (unknown names raise)."""
  fields = dict(
      method="clamp",        # "clamp": patch-contrastive L_C1; "psaq": PSAQ-ViT's entropy
      generator="pixels",    # "pixels" or "conv"
      num_images=32,
      steps=500,             # first generation
      refresh_steps=50,      # each warm-started refresh against new QuantParams
      lr=0.2, b1=0.5, b2=0.9, warmup_steps=50,
      conv_lr=1e-3,          # learning rate of the conv generator's weights (lr is for pixels)
      roll_fraction=1 / 15,  # random roll by up to +-round(side * roll_fraction) (>= 1) pixels
      flip=True,
      neighbourhood=3, positives=4, tau=0.1,
      w_contrast=1.0, w_ce=1.0, w_tv=0.05, w_pse=1.0,
      # clamp: minus this times KL(P || Q) of the logits, images where Q departs from P
      # (PSAQ-ViT V2's adversarial term); 0: off
      w_disagree=0.0,
      seed=0,                # used when `generate` is given no key
  )
  unknown = set(overrides) - set(fields)
  if unknown:
    raise ValueError(f"unknown config.generate fields {sorted(unknown)}; known: {sorted(fields)}")
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def uses_q(gen_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the loss looks at the quantized model Q (CLAMP's contrastive term, or the
  disagreement term)."""
  return gen_cfg.method == "clamp" and (gen_cfg.w_contrast > 0 or gen_cfg.w_disagree > 0)


def validate(gen_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first impossible `config.generate` value."""
  def fail(field, why):
    raise ValueError(f"config.generate.{field}={gen_cfg[field]!r} {why}")

  if gen_cfg.method not in METHODS:
    fail("method", f"is unknown; known: {list(METHODS)}")
  if gen_cfg.generator not in GENERATORS:
    fail("generator", f"is unknown; known: {list(GENERATORS)}")
  for field in ("num_images", "steps", "refresh_steps"):
    if gen_cfg[field] < 1:
      fail(field, "must be at least 1")
  if gen_cfg.warmup_steps < 0:
    fail("warmup_steps", "must be >= 0")
  for field in ("lr", "conv_lr", "tau"):
    if gen_cfg[field] <= 0:
      fail(field, "must be positive")
  for field in ("b1", "b2"):
    if not 0 <= gen_cfg[field] < 1:
      fail(field, "must be in [0, 1)")
  if not 0 <= gen_cfg.roll_fraction < 1:
    fail("roll_fraction", "must be in [0, 1)")
  k = gen_cfg.neighbourhood
  if k < 3 or k % 2 == 0:
    fail("neighbourhood", "must be odd and at least 3")
  if not 1 <= gen_cfg.positives <= k * k - 2:
    fail("positives", f"must be between 1 and {k * k - 2} (one negative must remain of the "
                      f"{k * k - 1} neighbours)")
  for field in ("w_contrast", "w_ce", "w_tv", "w_pse", "w_disagree"):
    if gen_cfg[field] < 0:
      fail(field, "must be >= 0 (0 disables the term)")
  main = "w_contrast" if gen_cfg.method == "clamp" else "w_pse"
  if gen_cfg[main] == 0 and not uses_q(gen_cfg) and gen_cfg.w_ce == 0 and gen_cfg.w_tv == 0:
    fail(main, f"is 0 like w_ce and w_tv: the {gen_cfg.method} loss has no term left")
