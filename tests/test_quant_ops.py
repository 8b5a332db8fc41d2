"""Quantization primitives: STE, uniform grid, log2, observers, integer export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clamp_jax.quant.export import from_int, to_int
from clamp_jax.quant.log2 import log2_fake_quant
from clamp_jax.quant.observers import minmax, omse, percentile, ptf
from clamp_jax.quant.ste import clip_ste, round_ste
from clamp_jax.quant.uniform import fake_quant, int_range, quantize_int

SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**31 - 1)
BITS = st.integers(2, 8)
# (shape, reduce_axes): per tensor and per channel along different axes.
GROUPINGS = st.sampled_from([((16, 8), None), ((16, 8), (0,)), ((16, 8), (1,)),
                             ((4, 5, 6), (0, 2)), ((4, 5, 6), (0, 1))])


def _data(seed, shape, heavy=False):
  rng = np.random.default_rng(seed)
  x = rng.standard_t(2, size=shape) if heavy else rng.normal(size=shape)
  return jnp.asarray(x * 10.0 ** rng.uniform(-2, 2) + rng.normal(), jnp.float32)


def _grid_bounds(scale, zero_point, bits, signed):
  """Float ends of the representable range."""
  qmin, qmax = int_range(bits, signed)
  return (qmin - zero_point) * scale, (qmax - zero_point) * scale


def _sq_error(x_hat, x, reduce_axes):
  return np.sum((np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)) ** 2,
                axis=reduce_axes)


# --- STE ---------------------------------------------------------------------------------

def test_round_ste_rounds_half_to_even_with_identity_gradient():
  x = jnp.asarray([-1.5, -0.5, 0.5, 1.5, 2.5, 0.7])
  np.testing.assert_array_equal(round_ste(x), [-2.0, -0.0, 0.0, 2.0, 2.0, 1.0])
  np.testing.assert_array_equal(jax.grad(lambda v: round_ste(v).sum())(x), np.ones(6))


def test_clip_ste_passes_gradient_everywhere_and_none_to_bounds():
  x = jnp.asarray([-3.0, 0.0, 1.0, 2.0, 5.0])
  lo, hi = jnp.asarray(0.0), jnp.asarray(2.0)
  np.testing.assert_array_equal(clip_ste(x, lo, hi), [0.0, 0.0, 1.0, 2.0, 2.0])
  gx, glo, ghi = jax.grad(lambda *a: clip_ste(*a).sum(), argnums=(0, 1, 2))(x, lo, hi)
  np.testing.assert_array_equal(gx, np.ones(5))
  assert glo == 0.0 and ghi == 0.0


def test_clip_ste_broadcasts_bounds():
  x = jnp.asarray([-1.0, 0.5, 3.0])
  lo, hi = jnp.zeros((2, 1)), jnp.asarray([[1.0], [2.0]])
  np.testing.assert_array_equal(clip_ste(x, lo, hi), [[0.0, 0.5, 1.0], [0.0, 0.5, 2.0]])
  gx, glo = jax.grad(lambda a, b: clip_ste(a, b, hi).sum(), argnums=(0, 1))(x, lo)
  np.testing.assert_array_equal(gx, [2.0, 2.0, 2.0])
  np.testing.assert_array_equal(glo, np.zeros((2, 1)))


# --- uniform grid ------------------------------------------------------------------------

def test_int_range():
  for bits, signed, want in [(8, False, (0, 255)), (4, False, (0, 15)),
                             (8, True, (-128, 127)), (4, True, (-8, 7))]:
    qmin, qmax = int_range(jnp.asarray(bits), signed)
    assert (float(qmin), float(qmax)) == want
    assert qmin.dtype == qmax.dtype == jnp.float32


@SETTINGS
@given(seed=SEEDS, bits=BITS, signed=st.booleans(), grouping=GROUPINGS)
def test_fake_quant_lies_on_the_grid_and_is_idempotent(seed, bits, signed, grouping):
  shape, axes = grouping
  calibration = _data(seed, shape)
  scale, zp = minmax(calibration, bits, signed, axes)
  x = 1.5 * calibration  # also values outside the calibrated range
  qmin, qmax = int_range(bits, signed)
  q = quantize_int(x, scale, zp, bits, signed)
  np.testing.assert_array_equal(q, np.round(q))
  assert np.all((q >= qmin) & (q <= qmax))
  x_hat = fake_quant(x, scale, zp, bits, signed)
  grid = x_hat / scale + zp
  np.testing.assert_allclose(grid, np.round(grid), atol=1e-3)
  assert np.all((grid >= qmin - 1e-3) & (grid <= qmax + 1e-3))
  np.testing.assert_allclose(fake_quant(x_hat, scale, zp, bits, signed), x_hat,
                             rtol=0, atol=1e-5 * float(np.max(scale)))


@SETTINGS
@given(seed=SEEDS, bits=st.integers(1, 8), signed=st.booleans(),
       log_scale=st.floats(-4, 3), zp_frac=st.floats(0, 1))
def test_error_is_at_most_half_a_step_inside_the_range(seed, bits, signed, log_scale, zp_frac):
  scale = jnp.float32(10.0 ** log_scale)
  qmin, qmax = int_range(bits, signed)
  zp = jnp.float32(0.0) if signed else jnp.round(zp_frac * qmax)
  lo, hi = _grid_bounds(scale, zp, bits, signed)
  x = jnp.asarray(np.random.default_rng(seed).uniform(lo, hi, size=256), jnp.float32)
  err = np.abs(fake_quant(x, scale, zp, bits, signed) - x)
  assert np.all(err <= scale / 2 * (1 + 1e-4) + 1e-7)


@SETTINGS
@given(seed=SEEDS, signed=st.booleans(), per_channel=st.booleans())
def test_error_does_not_grow_with_bits(seed, signed, per_channel):
  x = _data(seed, (64, 4))
  axes = (0,) if per_channel else None
  errors = []
  for bits in range(2, 9):
    scale, zp = minmax(x, bits, signed, axes)
    errors.append(np.max(np.abs(fake_quant(x, scale, zp, bits, signed) - x), axis=0))
  for coarse, fine in zip(errors, errors[1:]):
    assert np.all(fine <= coarse + 1e-6 * np.max(np.abs(x)))


@pytest.mark.parametrize("signed", [False, True])
def test_ste_gradient_inside_and_outside_the_range(signed):
  bits, scale = 4, jnp.float32(0.1)
  zp = jnp.float32(0.0 if signed else 5.0)
  lo, hi = _grid_bounds(scale, zp, bits, signed)
  inside = jnp.linspace(lo, hi, 101)  # both ends included
  outside = jnp.concatenate([lo - jnp.asarray([0.2, 1.0, 50.0]), hi + jnp.asarray([0.2, 1.0, 50.0])])
  grad = lambda x, mask: jax.grad(lambda v: fake_quant(v, scale, zp, bits, signed, mask).sum())(x)
  for mask in (False, True):
    np.testing.assert_array_equal(grad(inside, mask), np.ones(101))
  np.testing.assert_array_equal(grad(outside, False), np.ones(6))
  np.testing.assert_array_equal(grad(outside, True), np.zeros(6))
  x = jnp.concatenate([inside, outside])
  for mask in (False, True):
    bits_grad = jax.grad(lambda b: fake_quant(x, scale, zp, b, signed, mask).sum())(4.0)
    assert bits_grad == 0.0


@pytest.mark.parametrize("signed", [False, True])
def test_scale_gradient_is_lsq_s_inside_and_outside_the_range(signed):
  bits, scale = 3, jnp.float32(0.25)
  zp = jnp.float32(0.0 if signed else 2.0)
  x = jnp.asarray([-9.0, -1.1, -0.3, 0.1, 0.26, 0.5, 0.6, 0.99, 4.0])
  qmin, qmax = (-4.0, 3.0) if signed else (0.0, 7.0)
  unclipped = np.round(np.asarray(x) / 0.25) + float(zp)
  # LSQ: d x_hat / d s = round(x/s) - x/s inside the grid, its clipped end (less zp) outside.
  lsq = np.where(unclipped > qmax, qmax - float(zp), np.where(
      unclipped < qmin, qmin - float(zp), np.round(np.asarray(x) / 0.25) - np.asarray(x) / 0.25))
  assert (unclipped > qmax).any() and (unclipped < qmin).any()
  for mask in (False, True):
    per_element = jax.vmap(jax.grad(lambda s, v: fake_quant(v, s, zp, bits, signed, mask)),
                           in_axes=(None, 0))(scale, x)
    np.testing.assert_allclose(per_element, lsq, atol=1e-5)


@SETTINGS
@given(seed=SEEDS, bits=BITS, signed=st.booleans(), grouping=GROUPINGS)
def test_per_channel_shapes_and_channelwise_error_bound(seed, bits, signed, grouping):
  shape, axes = grouping
  x = _data(seed, shape)
  scale, zp = minmax(x, bits, signed, axes)
  want = () if axes is None else tuple(1 if a in axes else n for a, n in enumerate(shape))
  assert scale.shape == zp.shape == want
  err = np.abs(fake_quant(x, scale, zp, bits, signed) - x)
  assert np.all(err <= np.broadcast_to(scale, shape) * (0.5 + 1e-4))


@pytest.mark.parametrize("name", ["fake_quant", "fake_quant_signed", "log2", "minmax", "omse"])
def test_changing_bits_does_not_retrace(name):
  fns = {"fake_quant": lambda x, b: fake_quant(x, 0.05, 3.0, b),
         "fake_quant_signed": lambda x, b: fake_quant(x, 0.05, 0.0, b, signed=True),
         "log2": lambda x, b: log2_fake_quant(jnp.abs(x), b),
         "minmax": lambda x, b: minmax(x, b, reduce_axes=(0,)),
         "omse": lambda x, b: omse(x, b, num_candidates=5)}
  traces = []

  def traced(x, bits):
    traces.append(bits)
    return fns[name](x, bits)

  x = _data(0, (16, 8))
  jitted = jax.jit(traced)
  for bits in (8.0, 4.0, 2.0):
    got = jitted(x, jnp.asarray(bits))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                           got, fns[name](x, bits))
  assert len(traces) == 1


@pytest.mark.parametrize("signed", [False, True])
def test_vmap_over_a_population_equals_a_loop(signed):
  rng = np.random.default_rng(0)
  x = _data(1, (16, 8))
  bits = jnp.asarray(rng.integers(2, 9, size=64), jnp.float32)
  scale = jnp.asarray(10.0 ** rng.uniform(-2, 0, size=(64, 1, 8)), jnp.float32)
  zp = jnp.zeros((64, 1, 8)) if signed else jnp.round(
      jnp.asarray(rng.uniform(0, 1, size=(64, 1, 8))) * (2.0 ** bits[:, None, None] - 1))
  batched = jax.vmap(fake_quant, in_axes=(None, 0, 0, 0, None))(x, scale, zp, bits, signed)
  looped = np.stack([fake_quant(x, scale[i], zp[i], bits[i], signed) for i in range(64)])
  np.testing.assert_array_equal(batched, looped)
  pop_scale, pop_zp = jax.vmap(minmax, in_axes=(None, 0, None, None))(x, bits, signed, (0,))
  for i in (0, 31, 63):
    np.testing.assert_array_equal(pop_scale[i], minmax(x, bits[i], signed, (0,))[0])
    np.testing.assert_array_equal(pop_zp[i], minmax(x, bits[i], signed, (0,))[1])


# --- log2 --------------------------------------------------------------------------------

@SETTINGS
@given(seed=SEEDS, bits=st.integers(2, 6), temperature=st.floats(0.1, 10.0))
def test_log2_outputs_are_powers_of_two_in_range(seed, bits, temperature):
  logits = np.random.default_rng(seed).normal(size=(4, 33)) * temperature
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  x = jnp.concatenate([probs, jnp.asarray([[0.0, 1.0, 1e-30] + [0.5] * 30])])
  x_hat = log2_fake_quant(x, bits)
  smallest = 2.0 ** -(2**bits - 1)
  exponent = np.log2(np.asarray(x_hat, np.float64))
  np.testing.assert_array_equal(exponent, np.round(exponent))
  assert np.all((x_hat >= smallest) & (x_hat <= 1.0))
  assert x_hat[-1, 0] == smallest and x_hat[-1, 1] == 1.0
  above = x >= smallest
  ratio = np.asarray(x_hat)[above] / np.asarray(x)[above]
  assert np.all((ratio >= 2**-0.5 * (1 - 1e-6)) & (ratio <= 2**0.5 * (1 + 1e-6)))
  grad = jax.grad(lambda v: log2_fake_quant(v, bits).sum())(x)
  assert np.all(np.isfinite(grad))
  assert jax.grad(lambda b: log2_fake_quant(x, b).sum())(float(bits)) == 0.0


def test_log2_is_finite_for_zeros_at_every_bit_width():
  x = jnp.asarray([0.0, 0.0, 1e-38, 1e-20, 0.3, 1.0])
  for bits in range(1, 9):
    x_hat, grad = jax.value_and_grad(lambda v: log2_fake_quant(v, bits).sum())(x)
    assert np.isfinite(x_hat) and np.all(np.isfinite(grad))
    assert log2_fake_quant(x, bits)[-1] == 1.0


# --- observers ---------------------------------------------------------------------------

@SETTINGS
@given(seed=SEEDS, bits=BITS, signed=st.booleans(), grouping=GROUPINGS, heavy=st.booleans())
def test_minmax_covers_the_range(seed, bits, signed, grouping, heavy):
  shape, axes = grouping
  x = _data(seed, shape, heavy)
  scale, zp = minmax(x, bits, signed, axes)
  lo, hi = _grid_bounds(scale, zp, bits, signed)
  # The grid, widened by the half step that rounding the zero point may shift it by.
  tol = scale * (0.5 + 1e-4)
  assert np.all((lo - tol <= np.min(x, axis=axes, keepdims=axes is not None))
                & (hi + tol >= np.max(x, axis=axes, keepdims=axes is not None)))
  assert np.all(np.abs(fake_quant(x, scale, zp, bits, signed) - x) <= scale * (0.5 + 1e-4))


def test_observers_floor_the_scale_of_constant_tensors():
  for observer in (minmax, percentile, omse):
    for signed in (False, True):
      scale, zp = observer(jnp.zeros((4, 3)), 8, signed, (0,))
      assert np.all(scale > 0) and np.all(np.isfinite(zp))
      np.testing.assert_array_equal(fake_quant(jnp.zeros((4, 3)), scale, zp, 8, signed), 0.0)


@SETTINGS
@given(seed=SEEDS, bits=BITS, signed=st.booleans(), grouping=GROUPINGS,
       pct=st.floats(90.0, 100.0))
def test_percentile_range_lies_within_minmax(seed, bits, signed, grouping, pct):
  shape, axes = grouping
  x = _data(seed, shape, heavy=True)
  scale, _ = percentile(x, bits, signed, axes, pct=pct)
  scale_mm, _ = minmax(x, bits, signed, axes)
  assert scale.shape == scale_mm.shape
  assert np.all(scale <= scale_mm * (1 + 1e-6))


def test_percentile_100_is_minmax_and_bad_pct_raises():
  x = _data(3, (16, 8), heavy=True)
  for got, want in zip(percentile(x, 8, False, (0,), pct=100.0), minmax(x, 8, False, (0,))):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  with pytest.raises(ValueError, match="pct"):
    percentile(x, 8, pct=30.0)


@SETTINGS
@given(seed=SEEDS, bits=BITS, signed=st.booleans(), grouping=GROUPINGS)
def test_omse_error_is_at_most_minmax_error(seed, bits, signed, grouping):
  shape, axes = grouping
  x = _data(seed, shape, heavy=True)
  scale, zp = omse(x, bits, signed, axes)
  scale_mm, zp_mm = minmax(x, bits, signed, axes)
  assert scale.shape == scale_mm.shape and zp.shape == zp_mm.shape
  assert np.all(scale <= scale_mm * (1 + 1e-6))
  err = _sq_error(fake_quant(x, scale, zp, bits, signed), x, axes)
  err_mm = _sq_error(fake_quant(x, scale_mm, zp_mm, bits, signed), x, axes)
  assert np.all(err <= err_mm * (1 + 1e-5))


def test_omse_clips_outliers_of_heavy_tailed_data_under_jit():
  x = _data(4, (512, 4), heavy=True)
  scale, zp = jax.jit(omse, static_argnums=(2, 3))(x, jnp.asarray(4.0), False, (0,))
  scale_mm, zp_mm = minmax(x, 4, False, (0,))
  err = _sq_error(fake_quant(x, scale, zp, 4), x, 0)
  err_mm = _sq_error(fake_quant(x, scale_mm, zp_mm, 4), x, 0)
  assert np.sum(err) < 0.8 * np.sum(err_mm)
  with pytest.raises(ValueError, match="min_shrink"):
    omse(x, 4, min_shrink=0.0)


def _channel_spread_data(seed, shape, channel_axis):
  rng = np.random.default_rng(seed)
  spread_shape = [1] * len(shape)
  spread_shape[channel_axis] = shape[channel_axis]
  spread = 10.0 ** rng.uniform(-2, 1, size=spread_shape)
  return jnp.asarray(rng.normal(size=shape) * spread + 0.3 * spread, jnp.float32)


@SETTINGS
@given(seed=SEEDS, bits=BITS, num_factors=st.integers(0, 4),
       layout=st.sampled_from([((2, 16, 12), -1), ((12, 32), 0), ((3, 12, 10), 1)]))
def test_ptf_scales_are_power_of_two_factors_and_beat_per_tensor(seed, bits, num_factors, layout):
  shape, channel_axis = layout
  x = _channel_spread_data(seed, shape, channel_axis)
  scale, zp = ptf(x, bits, num_factors, channel_axis)
  want = [1] * len(shape)
  want[channel_axis] = shape[channel_axis]
  assert scale.shape == tuple(want) and zp.shape == ()
  scale_mm, zp_mm = minmax(x, bits)
  assert zp == zp_mm
  k = np.log2(np.asarray(scale, np.float64) / (float(scale_mm) / 2**num_factors))
  np.testing.assert_allclose(k, np.round(k), atol=1e-6)
  assert np.all((np.round(k) >= 0) & (np.round(k) <= num_factors))
  err = _sq_error(fake_quant(x, scale, zp, bits), x, None)
  err_mm = _sq_error(fake_quant(x, scale_mm, zp_mm, bits), x, None)
  assert err <= err_mm * (1 + 1e-5)


def test_ptf_helps_channels_with_very_different_ranges():
  x = _channel_spread_data(5, (4, 32, 16), -1)
  scale, zp = ptf(x, 8)
  scale_mm, zp_mm = minmax(x, 8)
  err = _sq_error(fake_quant(x, scale, zp, 8), x, None)
  err_mm = _sq_error(fake_quant(x, scale_mm, zp_mm, 8), x, None)
  assert err < 0.5 * err_mm
  assert len(np.unique(scale)) > 1
  with pytest.raises(ValueError, match="channel_axis"):
    ptf(x, 8, channel_axis=3)


# --- export ------------------------------------------------------------------------------

@SETTINGS
@given(seed=SEEDS, bits=st.sampled_from([2, 3, 4, 8]), signed=st.booleans(),
       grouping=GROUPINGS, clip_outliers=st.booleans())
def test_export_round_trips_exactly(seed, bits, signed, grouping, clip_outliers):
  shape, axes = grouping
  x = _data(seed, shape, heavy=True)
  observer = omse if clip_outliers else minmax
  scale, zp = observer(x, bits, signed, axes)
  q, zp_int = to_int(x, scale, zp, bits, signed)
  assert q.dtype == zp_int.dtype == jnp.int8
  assert q.shape == x.shape and zp_int.shape == zp.shape
  half = 2 ** (bits - 1)
  for ints in (q, zp_int):
    assert np.all((ints >= -half) & (ints <= half - 1))
  np.testing.assert_array_equal(from_int(q, zp_int, scale), fake_quant(x, scale, zp, bits, signed))


def test_export_rejects_wide_bits_and_fractional_zero_points():
  x = _data(6, (8,))
  with pytest.raises(ValueError, match="bit widths"):
    to_int(x, 0.1, 0.0, 9, signed=True)
  with pytest.raises(ValueError, match="bit widths"):
    to_int(x, 0.1, 0.0, jnp.asarray(16.0), signed=False)
  with pytest.raises(ValueError, match="zero_point"):
    to_int(x, 0.1, 3.5, 8, signed=False)


def test_export_under_jit_with_traced_bits():
  x = _data(7, (16, 8))
  scale, zp = minmax(x, 4, False, (0,))
  q, zp_int = jax.jit(to_int, static_argnums=4)(x, scale, zp, jnp.asarray(4.0), False)
  np.testing.assert_array_equal(from_int(q, zp_int, scale), fake_quant(x, scale, zp, 4))
