"""The activation x activation matmuls (q x k, probabilities x v) of a foreign linen ViT."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models.intercept import Rule, apply_quantized_layers, calibrate_layers
from clamp_jax.quant.params import LOG_SQRT2, UNIFORM
from clamp_jax.search import LayersEvaluator, search_config
from clamp_jax.search.fitness import output_loss
from clamp_jax.search.mixed import MixedEvolQ
from clamp_jax.search.strategy import stack

HEADS, WIDTH = 2, 8
MATMULS = [f"blocks_{b}/attn/matmul_{i}" for b in (0, 1) for i in (0, 1)]


@flax.struct.dataclass
class Output:
  logits: jax.Array
  tokens: jax.Array


class Block(nn.Module):
  """Pre-norm block in `setup` style around flax's own attention."""

  def setup(self):
    self.norm1, self.norm2 = nn.LayerNorm(), nn.LayerNorm()
    self.attn = nn.MultiHeadDotProductAttention(HEADS)
    self.fc1, self.fc2 = nn.Dense(2 * WIDTH), nn.Dense(WIDTH)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(nn.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
  """A ViT unlike ours: a list of blocks, mean pooling, a dataclass output."""

  def setup(self):
    self.patches = nn.Conv(WIDTH, (4, 4), strides=(4, 4), padding="VALID")
    self.blocks = [Block() for _ in range(2)]
    self.head = nn.Dense(5)

  def __call__(self, images):
    x = self.patches(images)
    x = x.reshape(x.shape[0], -1, WIDTH)
    for block in self.blocks:
      x = block(x)
    return Output(logits=self.head(x.mean(axis=1)), tokens=x)


@pytest.fixture(scope="module")
def vit():
  """The model, every parameter drawn at random (shapes by `eval_shape`: nothing compiled), images."""
  model, rng = TinyViT(), np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, 8, 8, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
  variables = jax.tree_util.tree_map(
      lambda a: jnp.asarray(rng.normal(scale=0.5, size=a.shape), jnp.float32), shapes)
  return model, variables, images


@pytest.fixture(scope="module")
def w4a4(vit):
  """W4/A4 `qparams` of every layer and matmul, and the quantized model's logits (jitted)."""
  model, variables, images = vit
  qparams, _ = calibrate_layers(model, variables, [Rule(".*", w_bits=4, a_bits=4)], images)
  logits = jax.jit(lambda q: apply_quantized_layers(model, variables, q, images).logits)
  return qparams, logits


def uniform_fq(x, site):
  """Asymmetric uniform fake quantization by hand, with `site`'s grid."""
  s, zp, qmax = float(site.scale), float(site.zero_point), 2.0 ** float(site.bits) - 1
  return (np.clip(np.round(x / s) + zp, 0, qmax) - zp) * s


def log_sqrt2_fq(x, site):
  """RepQ-ViT's log-sqrt(2) levels Delta * 2^(-q/2) by hand; q beyond the grid flushes to 0."""
  delta, qmax = float(site.scale), 2.0 ** float(site.bits) - 1
  q = np.round(-2 * np.log2(np.maximum(x, 1e-30) / delta))
  return np.where(q <= qmax, delta * 2.0 ** (-np.clip(q, 0, qmax) / 2), 0.0)


def minmax_scale(x, bits):
  return (max(x.max(), 0) - min(x.min(), 0)) / (2 ** bits - 1)


def captured(model, variables, images, qparams):
  """`(input, output)` of block 0's attention in the model quantized by `qparams`."""
  _, state = apply_quantized_layers(model, variables, qparams, images, mutable="intermediates",
                                    capture_intermediates=True)
  block = state["intermediates"]["blocks_0"]
  return (np.asarray(block["norm1"]["__call__"][0], np.float64),
          np.asarray(block["attn"]["__call__"][0], np.float64))


def test_quantized_attention_equals_hand_quantized_reference(vit):
  model, variables, images = vit
  rules = [Rule(r"blocks_0/attn/matmul", a_bits=4), Rule(".*", w_bits=0, a_bits=0)]
  qparams, report = calibrate_layers(model, variables, rules, images)
  assert sorted(qparams) == MATMULS[:2] and set(MATMULS) <= set(report.matched)
  qk, pv = qparams[MATMULS[0]], qparams[MATMULS[1]]
  assert [qk["lhs"].quantizer, qk["rhs"].quantizer, pv["lhs"].quantizer, pv["rhs"].quantizer] \
      == [UNIFORM, UNIFORM, LOG_SQRT2, UNIFORM]  # the probabilities found as softmax's output
  h, got = captured(model, variables, images, qparams)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables["params"])
  p = p["blocks_0"]["attn"]
  proj = lambda name: np.einsum("btd,dhe->bthe", h, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj("query") / np.sqrt(WIDTH // HEADS), proj("key"), proj("value")
  for x, site in ((q, qk["lhs"]), (k, qk["rhs"]), (v, pv["rhs"])):  # min-max on the float model
    np.testing.assert_allclose(site.scale, minmax_scale(x, 4), rtol=1e-5)
  logits = np.einsum("bqhd,bkhd->bhqk", uniform_fq(q, qk["lhs"]), uniform_fq(k, qk["rhs"]))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  context = np.einsum("bhqk,bkhd->bqhd", log_sqrt2_fq(probs, pv["lhs"]), uniform_fq(v, pv["rhs"]))
  want = np.einsum("bqhd,hdo->bqo", context, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, captured(model, variables, images, {})[1], atol=1e-3)


def test_a_rule_excluding_the_attention_leaves_it_float(vit, w4a4):
  model, variables, images = vit
  (q_on, logits), einsum = w4a4, jnp.einsum
  off = [Rule(r"/attn/matmul_\d+$", a_bits=0), Rule(".*", w_bits=4, a_bits=4)]
  q_off, report = calibrate_layers(model, variables, off, images)
  assert sorted(k for k in q_on if "matmul" in k) == MATMULS
  assert {k: report.matched[k] for k in MATMULS} == {k: off[0].pattern for k in MATMULS}
  assert q_off.keys() == set(q_on) - set(MATMULS)
  np.testing.assert_array_equal(logits(q_off), logits({k: q_on[k] for k in q_off}))
  q_float_probs, _ = calibrate_layers(model, variables, [Rule(".*", softmax="float")], images)
  assert set(q_float_probs[MATMULS[1]]) == {"rhs"}
  assert jnp.einsum is einsum  # the patches are gone
  with pytest.raises(ValueError, match="softmax"):
    Rule(".*", softmax="log3")


def test_w4a4_changes_with_the_matmul_sites_which_search_and_mixed_precision_move(vit, w4a4):
  model, variables, images = vit
  q_on, logits = w4a4
  on = logits(q_on)
  assert not np.allclose(on, logits({k: e for k, e in q_on.items() if k not in MATMULS}),
                         atol=1e-3)
  # The search scores candidates that differ in a matmul site only (vmapped, output_fn).
  site = q_on[MATMULS[0]]["lhs"]
  halved = {**q_on, MATMULS[0]: {**q_on[MATMULS[0]], "lhs": site.replace(scale=site.scale / 2)}}
  cfg = search_config(output_loss="kl")
  evaluator = LayersEvaluator(model, variables, cfg, output_fn=lambda out: out.logits)
  caches = evaluator.caches(q_on, images)
  scores = evaluator.score(None, stack([q_on, halved]), q_on, caches, None)
  np.testing.assert_allclose(scores[0], output_loss(on, caches[1], "kl", cfg.temperature),
                             rtol=1e-4)
  assert scores[0] != scores[1]
  # Mixed precision moves their uniform sites' bits within the rule's range.
  ranged, _ = calibrate_layers(model, variables, [Rule(".*", a_bits=4, a_range=(2, 8))], images)
  matmuls = {k: ranged[k] for k in MATMULS}
  logs = [(k, "lhs") for k in MATMULS[1::2]]
  mutated = MixedEvolQ(bit_mutation_prob=1.0).mutate(jax.random.PRNGKey(3), matmuls)
  bits = {(k, s): float(site.bits) for k, e in mutated.items() for s, site in e.items()}
  assert {b for (k, s), b in bits.items() if (k, s) not in logs} == {3.0, 5.0}
  assert [bits[key] for key in logs] == [4.0, 4.0]  # log-sqrt(2) sites keep their bits
