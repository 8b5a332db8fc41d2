"""Quantizing a linen model written here (not ours) through `nn.intercept_methods`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clamp_jax.models.intercept import Rule, apply_quantized_layers, calibrate_layers


class ForeignModel(nn.Module):
  """A model clamp_jax knows nothing about: Conv -> Dense -> Einsum -> DenseGeneral -> head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), strides=(2, 2), name="stem")(x)
    x = nn.relu(x).reshape(x.shape[0], -1, 6)           # [B, tokens, 6]
    x = nn.gelu(nn.Dense(8, name="mlp_in")(x))
    x = nn.Einsum((8, 5), "btd,de->bte", name="mix")(x)  # [B, tokens, 5]
    x = nn.DenseGeneral((2, 3), name="heads")(x)          # [B, tokens, 2, 3]
    return nn.Dense(4, name="head")(x.reshape(x.shape[0], -1))


def fq(x, axes, bits, range_of=None):
  """Hand-written asymmetric min-max fake quantization in numpy (the reference); the range
  is taken from `range_of` (default: `x` itself), reduced over `axes` (None: per tensor)."""
  x = np.asarray(x, np.float64)
  r = x if range_of is None else np.asarray(range_of, np.float64)
  lo = np.minimum(r.min(axis=axes, keepdims=axes is not None), 0)
  hi = np.maximum(r.max(axis=axes, keepdims=axes is not None), 0)
  qmax = 2.0 ** bits - 1
  scale = np.maximum((hi - lo) / qmax, 1e-8)
  zp = np.clip(np.round(-lo / scale), 0, qmax)
  return (np.clip(np.round(x / scale) + zp, 0, qmax) - zp) * scale


def reference_forward(p, x, w_bits, a_bits):
  """The model above by hand, every layer but the head quantized; input ranges are those of
  the float model (what calibration observes)."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  conv = lambda v, k: np.asarray(jax.lax.conv_general_dilated(
      jnp.asarray(v, jnp.float32), jnp.asarray(k, jnp.float32), (2, 2), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")), np.float64)
  gelu = lambda v: np.asarray(nn.gelu(jnp.asarray(v, jnp.float32)), np.float64)
  layers = [  # (name, op(input, kernel), activation after)
      ("stem", conv, lambda y: np.maximum(y, 0).reshape(y.shape[0], -1, 6)),
      ("mlp_in", lambda v, k: v @ k, gelu),
      ("mix", lambda v, k: np.einsum("btd,de->bte", v, k), lambda y: y),
      ("heads", lambda v, k: np.einsum("bte,ehc->bthc", v, k), lambda y: y.reshape(y.shape[0], -1)),
  ]
  float_x, quant_x = np.asarray(x, np.float64), np.asarray(x, np.float64)
  for name, op, after in layers:
    k, b = p[name]["kernel"], p[name]["bias"]
    out_axes = (0, 1, 2) if name == "stem" else (0,)
    quant_x = after(op(fq(quant_x, None, a_bits, range_of=float_x), fq(k, out_axes, w_bits)) + b)
    float_x = after(op(float_x, k) + b)
  return quant_x @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.fixture
def foreign():
  model = ForeignModel()
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 2))
  variables = model.init(jax.random.PRNGKey(0), x)
  variables = jax.tree_util.tree_map(  # random biases too
      lambda a: a + 0.2 * jax.random.normal(jax.random.PRNGKey(2), a.shape), variables)
  return model, variables, x


def test_intercepted_model_equals_hand_quantized_reference(foreign):
  model, variables, x = foreign
  rules = [Rule(r"^head$", w_bits=0, a_bits=0), Rule(r".*", w_bits=4, a_bits=6)]
  qparams, report = calibrate_layers(model, variables, rules, x)
  assert set(qparams) == {"stem", "mlp_in", "mix", "heads"}  # head: both parts float
  got = apply_quantized_layers(model, variables, qparams, x)
  want = reference_forward(variables["params"], x, 4, 6)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, model.apply(variables, x), atol=1e-3)  # it did quantize
  assert report.matched["head"] == r"^head$" and report.unused_rules == []


def test_first_matching_rule_wins_and_unused_rules_are_reported(foreign):
  model, variables, x = foreign
  rules = [Rule(r"mix", w_bits=2), Rule(r"^(stem|mlp_in|mix|heads|head)$", w_bits=8),
           Rule(r"encoderblock_\d+", w_bits=4)]
  qparams, report = calibrate_layers(model, variables, rules, x)
  assert float(qparams["mix"]["kernel"].bits) == 2
  assert float(qparams["stem"]["kernel"].bits) == 8
  assert report.unused_rules == [r"encoderblock_\d+"]


def test_layers_no_rule_matches_stay_float(foreign):
  model, variables, x = foreign
  qparams, report = calibrate_layers(model, variables, [Rule("nothing_here")], x)
  assert qparams == {} and sorted(report.unmatched_layers) == ["head", "heads", "mix", "mlp_in", "stem"]
  np.testing.assert_array_equal(apply_quantized_layers(model, variables, qparams, x),
                                model.apply(variables, x))


def test_intercepted_model_jits_and_vmaps_over_candidates(foreign):
  model, variables, x = foreign
  qparams, _ = calibrate_layers(model, variables, [Rule(".*", w_bits=4, a_bits=8)], x)
  factors = jnp.linspace(0.8, 1.2, 5)
  stacked = jax.vmap(lambda f: jax.tree_util.tree_map(lambda a: a, qparams) |
                     {"mix": {**qparams["mix"], "kernel": qparams["mix"]["kernel"].replace(
                         scale=qparams["mix"]["kernel"].scale * f)}})(factors)
  run = jax.jit(jax.vmap(lambda q: apply_quantized_layers(model, variables, q, x)))
  batched = run(stacked)
  for i in range(len(factors)):
    one = jax.tree_util.tree_map(lambda a: a[i], stacked)
    np.testing.assert_allclose(batched[i], apply_quantized_layers(model, variables, one, x),
                               atol=1e-5)
