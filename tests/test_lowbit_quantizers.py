"""Low-bit quantizers: RepQ-ViT's log-sqrt(2), PTQ4ViT's twin-uniform, RepQ-ViT's
post-LayerNorm scale reparameterization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clamp_jax.quant.log2 import log_sqrt2_fake_quant
from clamp_jax.quant.observers import minmax
from clamp_jax.quant.reparam import channel_grids, common_grid, fold_linear, fold_norm
from clamp_jax.quant.twin import GELU_MIN, twin_uniform_fake_quant, twin_uniform_scale
from clamp_jax.quant.uniform import fake_quant

SETTINGS = settings(max_examples=20, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**31 - 1)


def _mse(x_hat, x):
  return float(np.mean((np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)) ** 2))


# --- log-sqrt(2) -------------------------------------------------------------------------

def _probs(seed, temperature=3.0, shape=(4, 65)):
  logits = np.random.default_rng(seed).normal(size=shape) * temperature
  return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)


@SETTINGS
@given(seed=SEEDS, bits=st.integers(1, 6), log_delta=st.floats(-2, 0))
def test_log_sqrt2_lies_on_the_grid_and_is_idempotent(seed, bits, log_delta):
  delta = jnp.float32(10.0 ** log_delta)
  x = jnp.concatenate([_probs(seed).ravel(),
                       jnp.asarray([0.0, -0.2, 1e-30, 1.0, delta, 2 * delta])])
  x_hat = log_sqrt2_fake_quant(x, bits, delta)
  qmax = 2**bits - 1
  nonzero = np.asarray(x_hat) != 0
  q = -2 * np.log2(np.asarray(x_hat, np.float64)[nonzero] / float(delta))
  np.testing.assert_allclose(q, np.round(q), atol=1e-4)
  assert np.all((np.round(q) >= 0) & (np.round(q) <= qmax))
  assert np.all(np.asarray(x_hat)[np.asarray(x) <= 0] == 0)
  np.testing.assert_allclose(x_hat[-3:], float(delta), rtol=1e-6)  # x >= delta: the top level
  np.testing.assert_allclose(log_sqrt2_fake_quant(x_hat, bits, delta), x_hat, rtol=1e-6)


def test_log_sqrt2_matches_repq_vits_formula():
  """Delta * 2^(-ceil(q/2)) * (sqrt(2) if q is odd else 1), in float64, 0 past the last level."""
  delta, x = 0.8, np.asarray(_probs(1, 2.0, (16, 65)), np.float64).ravel()
  t = -2 * np.log2(x / delta)
  away = np.abs(t - np.floor(t) - 0.5) > 1e-3  # not at a rounding tie of float32 vs float64
  for bits in (2, 3, 4, 6):
    q = np.round(t)
    qc = np.clip(q, 0, 2**bits - 1)
    want = delta * 2.0 ** -np.ceil(qc / 2) * np.where(qc % 2 == 1, np.sqrt(2), 1.0)
    want = np.where(q > 2**bits - 1, 0.0, want)
    got = log_sqrt2_fake_quant(jnp.asarray(x, jnp.float32), bits, delta)
    np.testing.assert_allclose(np.asarray(got)[away], want[away], rtol=1e-6)
    assert np.any(want[away] > 0) and (bits > 3 or np.any(want[away] == 0))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_log_sqrt2_error_is_a_quarter_octave_inside_the_range(bits):
  delta = 0.6
  qmax = 2**bits - 1
  u = np.random.default_rng(bits).uniform(0, qmax, size=512)  # x from the top to the last level
  x = jnp.asarray(delta * 2.0 ** (-u / 2), jnp.float32)
  x_hat = np.asarray(log_sqrt2_fake_quant(x, bits, delta), np.float64)
  assert np.all(x_hat > 0)
  log_err = np.abs(np.log2(x_hat) - np.log2(np.asarray(x, np.float64)))
  assert np.all(log_err <= 0.25 + 1e-5)
  assert np.max(log_err) > 0.2  # the bound is nearly reached: the levels are half an octave apart


@pytest.mark.parametrize("bits", [1, 2, 4, 6])
def test_log_sqrt2_flushes_values_below_the_last_rounding_threshold(bits):
  delta = 0.9
  qmax = 2**bits - 1
  threshold = delta * 2.0 ** (-(qmax + 0.5) / 2)
  x = jnp.asarray([threshold * 0.999, threshold * 0.5, threshold * 1.001], jnp.float32)
  x_hat = log_sqrt2_fake_quant(x, bits, delta)
  assert x_hat[0] == 0 and x_hat[1] == 0
  np.testing.assert_allclose(x_hat[2], delta * 2.0 ** (-qmax / 2), rtol=1e-6)


def test_log_sqrt2_gradient_is_straight_through():
  bits, delta = 4, jnp.float32(0.5)
  kept = jnp.asarray(delta * 2.0 ** (-np.linspace(0, 15, 31) / 2), jnp.float32)
  above = jnp.asarray([0.6, 1.0, 3.0])
  flushed = jnp.asarray([0.0, -1.0, 1e-30, 1e-4])
  x = jnp.concatenate([kept, above, flushed])
  fn = lambda v, b, s: log_sqrt2_fake_quant(v, b, s).sum()
  gx, gbits, gdelta = jax.grad(fn, argnums=(0, 1, 2))(x, 4.0, delta)
  np.testing.assert_array_equal(gx, np.r_[np.ones(34), np.zeros(4)])
  assert gbits == 0.0
  x_hat = log_sqrt2_fake_quant(x, bits, delta)
  np.testing.assert_allclose(gdelta, np.sum(x_hat) / delta, rtol=1e-5)  # level / delta
  wild = jnp.asarray([0.0, 1e-38, 1e-20, 0.3, 1.0, 7.0])
  for b in range(1, 9):
    value, grad = jax.value_and_grad(lambda v: log_sqrt2_fake_quant(v, b).sum())(wild)
    assert np.isfinite(value) and np.all(np.isfinite(grad))


def test_log_sqrt2_traced_bits_do_not_retrace_and_vmap_over_delta_equals_a_loop():
  x = _probs(2)
  traces = []

  def traced(v, bits):
    traces.append(bits)
    return log_sqrt2_fake_quant(v, bits, 0.7)

  jitted = jax.jit(traced)
  for bits in (8.0, 4.0, 2.0):
    np.testing.assert_array_equal(jitted(x, jnp.asarray(bits)), log_sqrt2_fake_quant(x, bits, 0.7))
  assert len(traces) == 1
  deltas = jnp.asarray(10.0 ** np.random.default_rng(0).uniform(-2, 0, size=16), jnp.float32)
  bits = jnp.asarray(np.random.default_rng(1).integers(2, 9, size=16), jnp.float32)
  batched = jax.vmap(log_sqrt2_fake_quant, in_axes=(None, 0, 0))(x, bits, deltas)
  looped = np.stack([log_sqrt2_fake_quant(x, bits[i], deltas[i]) for i in range(16)])
  np.testing.assert_array_equal(batched, looped)


# --- twin-uniform ------------------------------------------------------------------------

def _gelu_outputs(seed, std=3.0, size=4096):
  x = np.random.default_rng(seed).normal(size=size) * std
  return jax.nn.gelu(jnp.asarray(x, jnp.float32), approximate=False)


@SETTINGS
@given(seed=SEEDS, bits=st.integers(2, 8), std=st.floats(0.5, 5.0))
def test_twin_lies_on_its_two_grids_and_is_idempotent(seed, bits, std):
  gelu = _gelu_outputs(seed, std, 512)
  scale = twin_uniform_scale(gelu, bits)
  x = jnp.concatenate([gelu, 1.5 * gelu, jnp.asarray([-0.5, -GELU_MIN, 0.0])])  # and beyond
  x_hat = np.asarray(twin_uniform_fake_quant(x, scale, bits), np.float64)
  half = 2.0 ** (bits - 1)
  neg_scale = GELU_MIN / half
  negative = np.asarray(x) < 0
  q_neg = x_hat[negative] / neg_scale
  q_pos = x_hat[~negative] / float(scale)
  np.testing.assert_allclose(q_neg, np.round(q_neg), atol=1e-3)
  np.testing.assert_allclose(q_pos, np.round(q_pos), atol=1e-3)
  assert np.all((np.round(q_neg) >= -half) & (np.round(q_neg) <= 0))
  assert np.all((np.round(q_pos) >= 0) & (np.round(q_pos) <= half - 1))
  np.testing.assert_allclose(twin_uniform_fake_quant(x_hat, scale, bits), x_hat,
                             rtol=0, atol=1e-5 * float(scale))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_twin_error_is_half_a_step_inside_each_region(bits):
  half = 2.0 ** (bits - 1)
  scale, neg_scale = 0.37, 0.013
  rng = np.random.default_rng(bits)
  neg = jnp.asarray(rng.uniform(-half * neg_scale, 0, size=256), jnp.float32)
  pos = jnp.asarray(rng.uniform(0, (half - 1) * scale, size=256), jnp.float32)
  for x, step in ((neg, neg_scale), (pos, scale)):
    err = np.abs(np.asarray(twin_uniform_fake_quant(x, scale, bits, neg_scale)) - np.asarray(x))
    assert np.all(err <= step / 2 * (1 + 1e-4) + 1e-7)


@pytest.mark.parametrize("std", [np.sqrt(3.0), 3.0])
def test_twin_keeps_the_negative_side_that_a_uniform_grid_loses(std):
  """At 4 bits on GELU outputs: the non-negative side is the symmetric min-max grid's, the
  negative side is far more accurate than on either min-max uniform grid."""
  bits = 4
  x = _gelu_outputs(0, std)
  twin = twin_uniform_fake_quant(x, twin_uniform_scale(x, bits), bits)
  sym = fake_quant(x, *minmax(x, bits, signed=True), bits, signed=True)
  asym = fake_quant(x, *minmax(x, bits), bits)
  negative = np.asarray(x) < 0
  np.testing.assert_allclose(np.asarray(twin)[~negative], np.asarray(sym)[~negative], rtol=1e-6)
  for uniform in (sym, asym):
    assert _mse(twin[negative], x[negative]) < 0.05 * _mse(uniform[negative], x[negative])
  assert _mse(twin, x) < _mse(sym, x)


def test_twin_gradient_is_straight_through_and_scale_is_min_max():
  bits = 4
  x = jnp.asarray([-5.0, -0.3, -0.17, -0.05, 0.0, 0.4, 2.0, 9.0, 50.0])
  gx, gbits = jax.grad(lambda v, b: twin_uniform_fake_quant(v, 1.0, b).sum(),
                       argnums=(0, 1))(x, 4.0)
  np.testing.assert_array_equal(gx, np.ones(x.shape))
  assert gbits == 0.0
  gelu = _gelu_outputs(3)
  for b in (2.0, 4.0, 8.0):
    got = jax.jit(twin_uniform_scale)(gelu, jnp.asarray(b))
    np.testing.assert_allclose(got, np.max(np.asarray(gelu)) / (2 ** (b - 1) - 1), rtol=1e-6)
  for flat in (jnp.zeros(8), -jnp.ones(8)):
    scale = twin_uniform_scale(flat, bits)
    assert scale > 0 and np.isfinite(scale)
    assert np.all(np.isfinite(twin_uniform_fake_quant(flat, scale, bits)))


# --- post-LayerNorm reparameterization ---------------------------------------------------

def _layernorm_output(seed, shape=(4, 16, 32), outliers=0, outlier_scale=50.0):
  """(n, gamma, beta, y): normalized input, affine parameters, output gamma * n + beta;
  `outliers` channels get gamma and beta `outlier_scale` times larger."""
  rng = np.random.default_rng(seed)
  d = shape[-1]
  h = rng.normal(size=shape) + rng.normal(size=d) * 2
  n = (h - h.mean(-1, keepdims=True)) / h.std(-1, keepdims=True)
  gamma = rng.uniform(0.3, 2.0, size=d) * rng.choice([-1, 1], size=d)
  beta = rng.normal(size=d) * 0.5
  big = rng.choice(d, size=outliers, replace=False)
  gamma[big] *= outlier_scale
  beta[big] *= outlier_scale
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return f32(n), f32(gamma), f32(beta), f32(gamma * n + beta)


def _linears(seed, d, heads=4, head_dim=8, features=24):
  """Kernels (D, H, K) and (D, F) with their biases."""
  rng = np.random.default_rng(seed)
  f32 = lambda *s: jnp.asarray(rng.normal(size=s) / np.sqrt(d), jnp.float32)
  return [(f32(d, heads, head_dim), f32(heads, head_dim)), (f32(d, features), f32(features))]


def _apply(y, kernel, bias):
  out = jnp.tensordot(y, kernel, axes=1, precision=jax.lax.Precision.HIGHEST)
  return out if bias is None else out + bias


@pytest.mark.parametrize("seed", [0, 1])
def test_folding_leaves_the_float_model_unchanged(seed):
  n, gamma, beta, y = _layernorm_output(seed, outliers=2)
  r, d, _, _ = common_grid(*channel_grids(y, 4))
  assert np.ptp(np.asarray(r)) > 1.0 and np.any(np.asarray(d) != 0)  # a real change
  gamma_f, beta_f = fold_norm(gamma, beta, r, d)
  y_f = gamma_f * n + beta_f
  np.testing.assert_allclose(y_f, y / r + d, rtol=1e-5, atol=1e-5)
  for kernel, bias in _linears(seed, y.shape[-1]) + [(_linears(seed, y.shape[-1])[1][0], None)]:
    kernel_f, bias_f = fold_linear(kernel, bias, r, d)
    assert kernel_f.shape == kernel.shape and bias_f.shape == kernel.shape[1:]
    np.testing.assert_allclose(_apply(y_f, kernel_f, bias_f), _apply(y, kernel, bias),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed,bits", [(0, 4), (1, 4), (2, 6), (3, 8)])
def test_per_tensor_quantization_after_folding_is_per_channel_quantization(seed, bits):
  n, gamma, beta, y = _layernorm_output(seed, outliers=3)
  scale_c, zero_point_c = channel_grids(y, bits)
  np.testing.assert_array_equal(zero_point_c, np.round(zero_point_c))
  r, d, scale, zero_point = common_grid(scale_c, zero_point_c)
  gamma_f, beta_f = fold_norm(gamma, beta, r, d)
  y_f = gamma_f * n + beta_f
  per_tensor = fake_quant(y_f, scale, zero_point, bits)
  per_channel = fake_quant(y, scale_c, zero_point_c, bits)
  np.testing.assert_allclose(per_tensor, per_channel / r + d, rtol=1e-5, atol=1e-4)
  for kernel, bias in _linears(seed, y.shape[-1]):
    kernel_f, bias_f = fold_linear(kernel, bias, r, d)
    np.testing.assert_allclose(_apply(per_tensor, kernel_f, bias_f),
                               _apply(per_channel, kernel, bias), rtol=1e-5, atol=1e-4)


@SETTINGS
@given(seed=SEEDS, bits=st.integers(2, 8), heavy=st.booleans())
def test_channel_grids_never_lose_to_per_channel_min_max(seed, bits, heavy):
  rng = np.random.default_rng(seed)
  x = rng.standard_t(2, size=(3, 200, 12)) if heavy else rng.normal(size=(3, 200, 12))
  x = jnp.asarray(x * rng.uniform(0.1, 10, size=12) + rng.normal(size=12), jnp.float32)
  scale, zero_point = channel_grids(x, bits)
  assert scale.shape == zero_point.shape == (12,)
  assert np.all((zero_point >= 0) & (zero_point <= 2**bits - 1))
  scale_mm, zero_point_mm = minmax(x, bits, reduce_axes=(0, 1))
  assert np.all(scale <= scale_mm.ravel() * (1 + 1e-6))
  err = lambda s, z: np.sum((np.asarray(fake_quant(x, s, z, bits), np.float64) - np.asarray(x)) ** 2,
                            axis=(0, 1))
  assert np.all(err(scale, zero_point) <= err(scale_mm, zero_point_mm) * (1 + 1e-5) + 1e-12)


def test_channel_grids_clip_a_lone_outlier_and_reject_bad_percentiles():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(20000, 4))
  x[rng.integers(0, 20000, size=4), np.arange(4)] = [60.0, -60.0, 100.0, -40.0]
  x = jnp.asarray(x, jnp.float32)
  scale, _ = channel_grids(x, 4)
  scale_mm, _ = minmax(x, 4, reduce_axes=(0,))
  # Clipping the outlier costs less than flattening the rest of the channel to a few levels.
  assert np.all(scale < 0.25 * scale_mm.ravel())
  with pytest.raises(ValueError, match="percentiles"):
    channel_grids(x, 4, percentiles=(0.2,))


@pytest.mark.parametrize("outlier_scale,bound", [(10.0, 0.1), (30.0, 0.2), (100.0, 0.4)])
def test_reparam_beats_per_tensor_min_max_on_outlier_channels(outlier_scale, bound):
  """Ordinary channels, which a per-tensor grid sized for the outliers flattens, keep their
  values; the total error shrinks less as the outlier channels' own error (the same on both
  grids) grows with them."""
  bits = 4
  n, gamma, beta, y = _layernorm_output(5, shape=(8, 32, 64), outliers=3,
                                        outlier_scale=outlier_scale)
  r, d, scale, zero_point = common_grid(*channel_grids(y, bits))
  gamma_f, beta_f = fold_norm(gamma, beta, r, d)
  y_hat_f = fake_quant(gamma_f * n + beta_f, scale, zero_point, bits)
  y_hat = fake_quant(y, *minmax(y, bits), bits)
  ordinary = np.abs(np.asarray(gamma)) < 2.5
  assert np.sum(~ordinary) == 3
  y_back = (y_hat_f - d) * r  # the reparameterized activation, mapped back onto y
  assert (_mse(y_back[..., ordinary], y[..., ordinary])
          < 0.02 * _mse(y_hat[..., ordinary], y[..., ordinary]))
  for kernel, bias in _linears(5, y.shape[-1]):
    want = _apply(y, kernel, bias)
    reparam = _apply(y_hat_f, *fold_linear(kernel, bias, r, d))
    assert _mse(reparam, want) < bound * _mse(_apply(y_hat, kernel, bias), want)
