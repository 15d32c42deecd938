"""Tests for ccdd_jax.augment (DSA)."""

import math

from conftest import config_section
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.method import augment as dsa

RANDOM_OPS = (
  "brightness",
  "saturation",
  "contrast",
  "color",
  "crop",
  "cutout",
  "flip",
  "scale",
  "rotate",
)
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _images(shape=(3, 8, 8, 3), seed=0, low=-1.0, high=1.0):
  return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


def _enable_x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # pylint: disable=g-import-not-at-top

  return enable_x64()


def _np_shift(image, d_row, d_col):
  height, width, _ = image.shape
  out = np.zeros_like(image)
  for i in range(height):
    for j in range(width):
      if 0 <= i + d_row < height and 0 <= j + d_col < width:
        out[i, j] = image[i + d_row, j + d_col]
  return out


def _np_grid_sample(image, theta):
  """Independent numpy torch affine_grid + grid_sample (align_corners=True, zeros)."""
  height, width, _ = image.shape
  out = np.zeros_like(image, dtype=np.float64)
  for i in range(height):
    for j in range(width):
      x_norm = -1 + 2 * j / (width - 1)
      y_norm = -1 + 2 * i / (height - 1)
      gx = theta[0, 0] * x_norm + theta[0, 1] * y_norm + theta[0, 2]
      gy = theta[1, 0] * x_norm + theta[1, 1] * y_norm + theta[1, 2]
      col = (gx + 1) / 2 * (width - 1)
      row = (gy + 1) / 2 * (height - 1)
      r0, c0 = math.floor(row), math.floor(col)
      for r, c in ((r0, c0), (r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1)):
        weight = (1 - abs(row - r)) * (1 - abs(col - c))
        if 0 <= r < height and 0 <= c < width:
          out[i, j] += weight * image[r, c]
  return out


@pytest.mark.parametrize("op_name", RANDOM_OPS)
def test_random_op_shape_dtype(op_name):
  images = _images((2, 8, 8, 1))
  out = getattr(dsa, op_name)(images, jax.random.key(0), dsa.default_params())
  assert out.shape == images.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def test_flip_probability_one_zero_and_half():
  images = _images()
  flipped = dsa.flip(images, jax.random.key(1), dsa.DSAConfig(flip_prob=1.0))
  np.testing.assert_array_equal(flipped, jnp.flip(images, axis=2))
  kept = dsa.flip(images, jax.random.key(1), dsa.DSAConfig(flip_prob=0.0))
  np.testing.assert_array_equal(kept, images)
  many = _images((256, 8, 8, 1))
  out = np.asarray(dsa.flip(many, jax.random.key(2), dsa.default_params()))
  is_flipped = np.all(out == many[:, :, ::-1], axis=(1, 2, 3))
  np.testing.assert_array_equal(is_flipped | np.all(out == many, axis=(1, 2, 3)), True)
  assert 0.4 < is_flipped.mean() < 0.6


def test_translate_known_shift_moves_pixels_and_fills_zeros():
  images = _images((3, 8, 8, 2), low=1.0, high=2.0)
  shifts = np.array([[2, -1], [0, 0], [-3, 4]])
  out = np.asarray(dsa.translate(images, shifts))
  for b in range(3):
    np.testing.assert_array_equal(out[b], _np_shift(images[b], *shifts[b]))
  assert np.all(out[0, 6:] == 0) and np.all(out[0, :, 0] == 0)  # Zero fill.


def test_crop_is_a_bounded_integer_shift_per_sample():
  images = _images((32, 8, 8, 1), low=1.0, high=2.0)
  out = np.asarray(dsa.crop(images, jax.random.key(3), dsa.default_params()))
  max_shift = dsa.max_crop_shift(8)
  assert max_shift == 1 and dsa.max_crop_shift(32) == 4
  found = []
  for b in range(32):
    matches = [
      (dr, dc)
      for dr in range(-max_shift, max_shift + 1)
      for dc in range(-max_shift, max_shift + 1)
      if np.array_equal(out[b], _np_shift(images[b], dr, dc))
    ]
    assert matches, f"sample {b} is not a shift within +-{max_shift}"
    found.append(matches[0])
  # Per-sample shifts covering the whole range [-max_shift, max_shift] per axis.
  full_range = set(range(-max_shift, max_shift + 1))
  assert {row for row, _ in found} == full_range == {col for _, col in found}


def test_cut_out_explicit_center_zeros_a_full_square():
  images = _images((2, 8, 8, 3), low=1.0, high=2.0)
  side = dsa.cutout_side(8)
  assert side == 4 and dsa.cutout_side(32) == 16
  out = np.asarray(dsa.cut_out(images, np.array([[4, 4], [2, 5]]), (side, side)))
  expected = images.copy()
  expected[0, 2:6, 2:6] = 0
  expected[1, 0:4, 3:7] = 0
  np.testing.assert_array_equal(out, expected)


def test_cutout_zeros_a_possibly_clipped_square_per_sample():
  height = 8
  side = dsa.cutout_side(height)
  images = _images((64, height, height, 2), low=1.0, high=2.0)
  out = np.asarray(dsa.cutout(images, jax.random.key(4), dsa.default_params()))
  full_squares = 0
  centers = []
  for b in range(images.shape[0]):
    zeros = np.all(out[b] == 0, axis=-1)
    np.testing.assert_array_equal(out[b][~zeros], images[b][~zeros])
    matches = []
    for center_row in range(height + 1 - side % 2):
      for center_col in range(height + 1 - side % 2):
        mask = np.zeros((height, height), bool)
        top, left = center_row - side // 2, center_col - side // 2
        mask[max(top, 0) : top + side, max(left, 0) : left + side] = True
        if np.array_equal(mask, zeros):
          matches.append((center_row, center_col))
    assert matches, f"sample {b}: zeroed region is not a clipped square"
    centers.append(matches[0])
    full_squares += zeros.sum() == side * side
  assert full_squares > 0
  # As in the reference, centres range over [0, H] for an even side.
  centers = np.array(centers)
  np.testing.assert_array_equal(centers.min(axis=0), [0, 0])
  np.testing.assert_array_equal(centers.max(axis=0), [height, height])


def test_rotate_zero_and_scale_one_are_identity():
  images = _images((2, 8, 8, 3))
  key = jax.random.key(5)
  np.testing.assert_allclose(
    dsa.rotate(images, key, dsa.DSAConfig(rotate_degrees=0.0)), images, atol=1e-5
  )
  np.testing.assert_allclose(dsa.scale(images, key, dsa.DSAConfig(scale=1.0)), images, atol=1e-5)


def test_rotate_90_degrees_equals_rot90_counter_clockwise():
  images = _images((2, 8, 8, 3))
  out = dsa.affine_warp(images, dsa.rotation_matrices(jnp.full((2,), math.pi / 2)))
  expected = np.rot90(images, k=1, axes=(1, 2))
  np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (2, 6, 9, 2)])
def test_affine_warp_matches_numpy_grid_sample(shape):
  images = _images(shape)
  rng = np.random.default_rng(1)
  theta = np.stack(
    [
      dsa.rotation_matrices(jnp.asarray(rng.uniform(-0.5, 0.5, 2)))[0],
      dsa.scale_matrices(jnp.asarray([0.8, 1.2]), jnp.asarray([1.1, 0.9]))[1],
    ]
  )
  theta[0, :, 2] = [0.1, -0.2]  # Translation too.
  out = np.asarray(dsa.affine_warp(images, theta))
  for b in range(shape[0]):
    np.testing.assert_allclose(out[b], _np_grid_sample(images[b], theta[b]), atol=1e-5)


def test_color_adjustments_match_numpy_formulas():
  images = _images((3, 4, 4, 3))
  values = np.array([0.3, -0.2, 1.7], np.float32)
  per_sample = values[:, None, None, None]
  np.testing.assert_allclose(dsa.adjust_brightness(images, values), images + per_sample, rtol=1e-6)
  channel_mean = images.mean(axis=3, keepdims=True)
  np.testing.assert_allclose(
    dsa.adjust_saturation(images, values),
    (images - channel_mean) * per_sample + channel_mean,
    rtol=1e-5,
    atol=1e-6,
  )
  sample_mean = images.mean(axis=(1, 2, 3), keepdims=True)
  np.testing.assert_allclose(
    dsa.adjust_contrast(images, values),
    (images - sample_mean) * per_sample + sample_mean,
    rtol=1e-5,
    atol=1e-6,
  )


def test_random_color_parameters_are_in_range():
  images = _images((16, 4, 4, 3))
  offsets = np.asarray(dsa.brightness(images, jax.random.key(6)) - images)
  per_sample_offset = offsets[:, 0, 0, 0]
  np.testing.assert_allclose(
    offsets, np.broadcast_to(per_sample_offset[:, None, None, None], offsets.shape), atol=1e-6
  )
  assert np.all(np.abs(per_sample_offset) <= 0.5) and np.ptp(per_sample_offset) > 0.1
  # Contrast factor U + 0.5 in [0.5, 1.5]: the deviation from the mean scales by it.
  out = np.asarray(dsa.contrast(images, jax.random.key(7)))
  deviation_in = images - images.mean(axis=(1, 2, 3), keepdims=True)
  deviation_out = out - out.mean(axis=(1, 2, 3), keepdims=True)
  factors = deviation_out[:, 0, 0, 0] / deviation_in[:, 0, 0, 0]
  assert np.all((factors >= 0.5 - 1e-4) & (factors <= 1.5 + 1e-4))


@pytest.mark.parametrize("strategy", FAMILIES + (dsa.DEFAULT_STRATEGY,))
def test_siamese_same_rng_same_transformation(strategy):
  real, synthetic = _images(seed=1), _images(seed=2)
  zeros = np.zeros_like(real)
  run = jax.jit(lambda x, key: dsa.augment(x, key, strategy=strategy))
  for seed in range(3):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(run(real, key), run(real, key))
    # Every family is affine per sample, f(x) = A x + c: with the same A and c,
    # f(a) + f(b) - f(0) = f(a + b).
    np.testing.assert_allclose(
      run(real, key) + run(synthetic, key) - run(zeros, key), run(real + synthetic, key), atol=1e-5
    )
  other = [np.asarray(run(real, jax.random.key(seed))) for seed in (10, 11)]
  assert not np.allclose(other[0], other[1])


def test_family_is_chosen_at_random_per_call():
  images = _images()
  params = dsa.DSAConfig(strategy="flip_brightness", flip_prob=1.0)
  run = jax.jit(lambda key: dsa.augment(images, key, params))
  picked = set()
  for seed in range(12):
    out = np.asarray(run(jax.random.key(seed)))
    if np.array_equal(out, np.flip(images, axis=2)):
      picked.add("flip")
    else:
      difference = out - images
      np.testing.assert_allclose(
        difference, np.broadcast_to(difference[:, :1, :1, :1], difference.shape), atol=1e-6
      )
      picked.add("brightness")
  assert picked == {"flip", "brightness"}


@pytest.mark.parametrize("strategy", ["none", "", "None"])
def test_none_strategy_is_identity(strategy):
  images = _images()
  np.testing.assert_array_equal(dsa.augment(images, jax.random.key(0), strategy=strategy), images)


def test_unknown_op_raises():
  with pytest.raises(CCDDError, match="blur"):
    dsa.augment(_images(), jax.random.key(0), strategy="color_blur")
  with pytest.raises(CCDDError, match="blur"):
    dsa.DSAConfig(strategy="crop_blur")


def test_params_from_config_dict_and_bad_settings():
  config = config_section("dsa", strategy="flip")
  config.flip_prob = 1.0
  params = dsa.as_params(config)
  assert params == dsa.DSAConfig(strategy="flip", flip_prob=1.0)
  with pytest.raises(CCDDError, match="flip_probability"):
    dsa.as_params({"flip_probability": 1.0})
  with pytest.raises(CCDDError, match="scale"):
    dsa.DSAConfig(scale=0.5)
  with pytest.raises(ValueError, match="NHWC"):
    dsa.augment(jnp.zeros((8, 8, 3)), jax.random.key(0))


@pytest.mark.slow
def test_gradients_match_finite_differences_to_second_order():
  # One jitted function for all families keeps the compile time down.
  with _enable_x64():
    images = jnp.asarray(_images((2, 8, 8, 2)), jnp.float64)
    weights = jnp.asarray(_images((2, 8, 8, 2), seed=3), jnp.float64)
    direction = jnp.asarray(_images((2, 8, 8, 2), seed=4), jnp.float64)
    key = jax.random.key(8)

    def family_loss(x, strategy):
      return jnp.sum(jnp.sin(dsa.augment(x, key, strategy=strategy)) * weights)

    losses = jax.jit(lambda x: jnp.stack([family_loss(x, f) for f in FAMILIES]))
    grads = jax.jit(lambda x: jnp.stack([jax.grad(family_loss)(x, f) for f in FAMILIES]))
    hessian_vector_products = jax.jit(
      lambda x, v: jnp.stack(
        [jax.jvp(lambda y, f=f: jax.grad(family_loss)(y, f), (x,), (v,))[1] for f in FAMILIES]
      )
    )
    assert losses(images).dtype == jnp.float64
    eps = 1e-5
    loss_difference = (losses(images + eps * direction) - losses(images - eps * direction)) / (
      2 * eps
    )
    grad_difference = (grads(images + eps * direction) - grads(images - eps * direction)) / (
      2 * eps
    )
    directional = jnp.sum(grads(images) * direction, axis=(1, 2, 3, 4))
    second_order = hessian_vector_products(images, direction)
    for index, family in enumerate(FAMILIES):
      np.testing.assert_allclose(
        directional[index], loss_difference[index], rtol=1e-6, atol=1e-8, err_msg=family
      )
      np.testing.assert_allclose(
        second_order[index], grad_difference[index], rtol=1e-5, atol=1e-7, err_msg=family
      )
      assert np.any(second_order[index] != 0), family


def _unrolled_distillation_loss(synthetic, key, weights0, target):
  """Two SGD steps of a linear model on augmented synthetic images, then a match loss."""

  def step(weights, step_key):
    def inner_loss(w):
      features = dsa.augment(synthetic, step_key).reshape(synthetic.shape[0], -1)
      return jnp.mean(jnp.tanh(features @ w) ** 2)

    return weights - 0.1 * jax.grad(inner_loss)(weights), None

  weights, _ = lax.scan(step, weights0, jax.random.split(key, 2))
  return jnp.sum((weights - target) ** 2)


@pytest.mark.slow
def test_second_order_gradient_through_unrolled_sgd():
  with _enable_x64():
    synthetic = jnp.asarray(_images((2, 8, 8, 1)), jnp.float64)
    weights0 = jnp.asarray(_images((64, 3), seed=4), jnp.float64) * 0.1
    target = jnp.asarray(_images((64, 3), seed=5), jnp.float64) * 0.1
    key = jax.random.key(9)
    loss = jax.jit(lambda x: _unrolled_distillation_loss(x, key, weights0, target))
    grad = jax.jit(jax.grad(loss))(synthetic)
    assert grad.shape == synthetic.shape and grad.dtype == jnp.float64
    assert np.all(np.isfinite(grad)) and np.any(grad != 0)
    eps = 1e-5
    for seed in range(3):
      direction = jnp.asarray(_images(synthetic.shape, seed=20 + seed), jnp.float64)
      finite_difference = (
        loss(synthetic + eps * direction) - loss(synthetic - eps * direction)
      ) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(grad, direction), finite_difference, rtol=1e-6)


@pytest.mark.slow
def test_jit_vmap_and_scan_agree_with_eager_calls():
  images = _images((2, 8, 8, 3))
  keys = jax.random.split(jax.random.key(10), 4)
  eager = np.stack([dsa.augment(images, key) for key in keys])
  vmapped = jax.vmap(dsa.augment, in_axes=(None, 0))(images, keys)
  np.testing.assert_allclose(vmapped, eager, atol=1e-6)

  def body(carry, key):
    out = dsa.augment(images, key)
    return carry + out.sum(), out

  total, scanned = lax.scan(body, jnp.zeros(()), keys)
  np.testing.assert_allclose(scanned, eager, atol=1e-6)
  np.testing.assert_allclose(total, eager.sum(), rtol=1e-5)


def test_legacy_uint32_keys_work():
  images = _images()
  params = dsa.DSAConfig(strategy="flip_crop")
  out = jax.jit(dsa.augment)(images, jax.random.PRNGKey(0), params)
  np.testing.assert_array_equal(out, dsa.augment(images, jax.random.PRNGKey(0), params))


@pytest.mark.parametrize("family", FAMILIES)
def test_trigger_safe_dsa_leaves_the_stamped_corner_unchanged(family):
  images = jnp.asarray(_images((16, 8, 8, 1), seed=3))
  keep = np.zeros((1, 8, 8, 1), np.float32)
  keep[:, :4, :4] = 1.0  # watermark.corner_mask((8, 8), 4)
  params = config_section("dsa", strategy=family)
  out = dsa.augment_keeping(images, jax.random.PRNGKey(1), params, keep)
  np.testing.assert_array_equal(out[:, :4, :4], images[:, :4, :4])
  plain = dsa.augment(images, jax.random.PRNGKey(1), params)
  np.testing.assert_array_equal(out[:, 4:], plain[:, 4:])  # Elsewhere: the same DSA.
  np.testing.assert_array_equal(out[:, :, 4:], plain[:, :, 4:])
  assert np.abs(plain[:, :4, :4] - images[:, :4, :4]).max() > 1e-3  # DSA does move it.
  np.testing.assert_array_equal(dsa.augment_keeping(images, jax.random.PRNGKey(1), params), plain)
