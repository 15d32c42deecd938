"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) for NHWC images.

This follows the DSA used by the MTT reference (`DiffAugment` with
`ParamDiffAug`, aug_mode "S"): the strategy is an underscore-separated list of
families, e.g. "color_crop_cutout_flip_scale_rotate"; every call of `augment`
picks ONE family uniformly at random and applies it with random parameters
drawn independently for every sample of the batch.

Families and their per-sample parameters (U ~ uniform[0, 1)):
  color:   brightness x + (U - 0.5) * brightness, then
           saturation (x - mean_c x) * (U * saturation) + mean_c x, then
           contrast (x - mean_chw x) * (U + contrast) + mean_chw x.
  crop:    integer translation by up to int(H * crop_ratio + 0.5) pixels along
           each axis, zero fill.
  cutout:  a square of side int(H * cutout_ratio + 0.5) set to zero; its
           centre may lie on the border, so the square can be clipped.
  flip:    horizontal (W axis) flip with probability flip_prob.
  scale:   affine scaling of the sampling grid by sx, sy ~ U[1/scale, scale].
  rotate:  affine rotation by an angle ~ U[-rotate_degrees, rotate_degrees].
The affine families sample bilinearly with zero padding, like PyTorch's
`affine_grid` + `grid_sample` with align_corners=True.

Siamese property: every random quantity is drawn from the `rng` argument with
shapes that depend only on the batch size, so two calls with the same `rng` on
batches of the same shape (e.g. a real and a synthetic batch) apply exactly the
same family with exactly the same per-sample parameters.

Every op is affine in the image values (geometric ops are gathers and bilinear
interpolation with weights that do not depend on the images), so the output is
differentiable to any order with respect to the images.

Besides the random ops (`brightness`, ..., `rotate`, each
`(images, rng, params) -> images`), the deterministic transforms they use are
public and take explicit parameters: `adjust_brightness`, `adjust_saturation`,
`adjust_contrast`, `translate`, `cut_out`, `flip_where` and `affine_warp` (with
`scale_matrices` / `rotation_matrices`).
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from ccdd_jax import CCDDError
from ccdd_jax import lists

Array = jax.Array
PRNGKey = jax.Array

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


@dataclasses.dataclass(frozen=True)
class DSAConfig:
  """Hyperparameters of DSA; the defaults are those of the MTT reference."""

  strategy: str = DEFAULT_STRATEGY
  scale: float = 1.2
  rotate_degrees: float = 15.0
  crop_ratio: float = 0.125
  cutout_ratio: float = 0.5
  brightness: float = 1.0
  saturation: float = 2.0
  contrast: float = 0.5
  flip_prob: float = 0.5

  def __post_init__(self):
    if not isinstance(self.strategy, str):
      raise CCDDError(f"dsa strategy must be a string, got {self.strategy!r}")
    parse_strategy(self.strategy)
    if not self.scale >= 1.0:
      raise CCDDError(f"dsa scale must be >= 1, got {self.scale}")
    if not 0.0 <= self.flip_prob <= 1.0:
      raise CCDDError(f"dsa flip_prob must be in [0, 1], got {self.flip_prob}")
    if not self.crop_ratio >= 0.0:
      raise CCDDError(f"dsa crop_ratio must be >= 0, got {self.crop_ratio}")
    if not 0.0 <= self.cutout_ratio <= 1.0:
      raise CCDDError(f"dsa cutout_ratio must be in [0, 1], got {self.cutout_ratio}")
    if not self.rotate_degrees >= 0.0:
      raise CCDDError(f"dsa rotate_degrees must be >= 0, got {self.rotate_degrees}")


# A config holds no arrays: registering it as a leafless pytree lets it be
# passed straight through `jax.jit` (it becomes part of the static structure).
jax.tree_util.register_pytree_node(DSAConfig, lambda config: ((), config), lambda config, _: config)


def default_params() -> DSAConfig:
  """Returns the DSA hyperparameters of the MTT reference."""
  return DSAConfig()


def as_params(params: None | DSAConfig | Mapping[str, Any] | Any) -> DSAConfig:
  """Converts None, a DSAConfig, a dict or an ml_collections ConfigDict to a DSAConfig."""
  if params is None:
    return DSAConfig()
  if isinstance(params, DSAConfig):
    return params
  if hasattr(params, "to_dict"):  # ml_collections.ConfigDict
    params = params.to_dict()
  if not isinstance(params, Mapping):
    raise CCDDError(f"dsa params must be a DSAConfig or a mapping, got {type(params).__name__}")
  known = {field.name for field in dataclasses.fields(DSAConfig)}
  unknown = sorted(set(params) - known)
  if unknown:
    raise CCDDError(
      f"unknown dsa setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
    )
  return DSAConfig(**params)


# ---------------------------------------------------------------------------
# Helpers.


def _jit_with_static_params(op: Callable[..., Array]) -> Callable[..., Array]:
  """Wraps a random op so eager calls run one compiled function per shape and params."""
  jitted = jax.jit(op, static_argnames="params")

  @functools.wraps(op)
  def wrapper(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
    return jitted(images, rng, params=as_params(params))

  return wrapper


def _check_float_nhwc(images: Array) -> None:
  if images.ndim != 4:
    raise ValueError(f"augment expects NHWC images (4-D), got shape {tuple(images.shape)}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"augment expects floating-point images, got dtype {images.dtype}")


def _per_sample(values: Array, images: Array) -> Array:
  """Reshapes a (B,) vector to broadcast against NHWC images, in their dtype."""
  return jnp.asarray(values).astype(images.dtype).reshape(-1, 1, 1, 1)


def _uniform(rng: PRNGKey, batch_size: int, minval: float = 0.0, maxval: float = 1.0) -> Array:
  """Per-sample float32 uniform draws (float32 so results do not depend on x64)."""
  return jax.random.uniform(rng, (batch_size,), jnp.float32, minval, maxval)


def _gather_pixels(images: Array, rows: Array, cols: Array) -> Array:
  """Returns images[b, rows[b, i, j], cols[b, i, j], :], zero outside the image."""
  batch, height, width, channels = images.shape
  inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
  flat_index = jnp.clip(rows, 0, height - 1) * width + jnp.clip(cols, 0, width - 1)
  flat_images = images.reshape(batch, height * width, channels)
  gathered = jnp.take_along_axis(flat_images, flat_index.reshape(batch, -1, 1), axis=1)
  gathered = gathered.reshape(rows.shape + (channels,))
  return jnp.where(inside[..., None], gathered, jnp.zeros((), images.dtype))


def _bilinear_sample(images: Array, rows: Array, cols: Array) -> Array:
  """Bilinear sampling at float pixel coordinates (B, H, W) with zero padding."""
  row_floor = jnp.floor(rows)
  col_floor = jnp.floor(cols)
  row_frac = (rows - row_floor)[..., None]
  col_frac = (cols - col_floor)[..., None]
  row0 = row_floor.astype(jnp.int32)
  col0 = col_floor.astype(jnp.int32)
  weight_dtype = jnp.promote_types(images.dtype, jnp.float32)
  corners = (
    (row0, col0, (1 - row_frac) * (1 - col_frac)),
    (row0, col0 + 1, (1 - row_frac) * col_frac),
    (row0 + 1, col0, row_frac * (1 - col_frac)),
    (row0 + 1, col0 + 1, row_frac * col_frac),
  )
  output = sum(_gather_pixels(images, r, c) * w.astype(weight_dtype) for r, c, w in corners)
  return output.astype(images.dtype)


# ---------------------------------------------------------------------------
# Deterministic transforms with explicit per-sample parameters.


def adjust_brightness(images: Array, offsets: Array) -> Array:
  """Adds offsets[b] to every value of sample b."""
  return images + _per_sample(offsets, images)


def adjust_saturation(images: Array, factors: Array) -> Array:
  """Scales each pixel's deviation from its channel mean by factors[b]."""
  channel_mean = jnp.mean(images, axis=3, keepdims=True)
  return (images - channel_mean) * _per_sample(factors, images) + channel_mean


def adjust_contrast(images: Array, factors: Array) -> Array:
  """Scales each sample's deviation from its mean over H, W, C by factors[b]."""
  sample_mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
  return (images - sample_mean) * _per_sample(factors, images) + sample_mean


@jax.jit
def translate(images: Array, shifts: Array) -> Array:
  """Integer shift: out[b, i, j] = images[b, i + shifts[b, 0], j + shifts[b, 1]], else 0.

  A positive shift moves the content up (rows) / left (columns), as in the
  MTT reference's `rand_crop` (translation_x indexes rows there).
  """
  _check_float_nhwc(images)
  _, height, width, _ = images.shape
  shifts = jnp.asarray(shifts, jnp.int32)
  rows = jnp.arange(height, dtype=jnp.int32)[None, :, None] + shifts[:, 0, None, None]
  cols = jnp.arange(width, dtype=jnp.int32)[None, None, :] + shifts[:, 1, None, None]
  rows, cols = jnp.broadcast_arrays(rows, cols)
  return _gather_pixels(images, rows, cols)


def cut_out(images: Array, centers: Array, size: Sequence[int]) -> Array:
  """Zeros the (h, w) = `size` box at centers[b] - size // 2, clipped to the image."""
  _check_float_nhwc(images)
  _, height, width, _ = images.shape
  box_height, box_width = size
  centers = jnp.asarray(centers, jnp.int32)
  top = (centers[:, 0] - box_height // 2)[:, None, None]
  left = (centers[:, 1] - box_width // 2)[:, None, None]
  rows = jnp.arange(height, dtype=jnp.int32)[None, :, None]
  cols = jnp.arange(width, dtype=jnp.int32)[None, None, :]
  in_box = (rows >= top) & (rows < top + box_height) & (cols >= left) & (cols < left + box_width)
  return jnp.where(in_box[..., None], jnp.zeros((), images.dtype), images)


def flip_where(images: Array, should_flip: Array) -> Array:
  """Flips sample b horizontally (along W) where should_flip[b] is true."""
  should_flip = jnp.asarray(should_flip, bool).reshape(-1, 1, 1, 1)
  return jnp.where(should_flip, jnp.flip(images, axis=2), images)


def scale_matrices(scale_x: Array, scale_y: Array) -> Array:
  """(B, 2, 3) affine matrices diag(scale_x, scale_y) in PyTorch affine_grid convention."""
  zeros = jnp.zeros_like(scale_x)
  return jnp.stack(
    [jnp.stack([scale_x, zeros, zeros], axis=-1), jnp.stack([zeros, scale_y, zeros], axis=-1)],
    axis=-2,
  )


def rotation_matrices(angles: Array) -> Array:
  """(B, 2, 3) rotation matrices [[cos, -sin, 0], [sin, cos, 0]]; angles in radians.

  With `affine_warp`, a positive angle rotates the content counter-clockwise as
  displayed with row 0 on top: +90 degrees equals np.rot90(image, k=1) on (H, W).
  """
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  zeros = jnp.zeros_like(angles)
  return jnp.stack(
    [jnp.stack([cos, -sin, zeros], axis=-1), jnp.stack([sin, cos, zeros], axis=-1)], axis=-2
  )


@jax.jit
def affine_warp(images: Array, theta: Array) -> Array:
  """Warps like torch affine_grid + grid_sample(align_corners=True, zero padding).

  theta, shape (B, 2, 3), maps normalised output coordinates (x along W, y
  along H, both in [-1, 1]) to normalised input coordinates; values are
  sampled bilinearly and points outside the input read as zero.
  """
  _check_float_nhwc(images)
  _, height, width, _ = images.shape
  theta = jnp.asarray(theta, jnp.float32)
  # Equivalent to the normalised form, written around the image centre so that
  # the identity (and exact quarter turns) map pixel centres exactly.
  half_h = (height - 1) / 2.0
  half_w = (width - 1) / 2.0
  y = (jnp.arange(height, dtype=jnp.float32) - half_h)[None, :, None]
  x = (jnp.arange(width, dtype=jnp.float32) - half_w)[None, None, :]
  aspect_w_over_h = (width - 1) / max(height - 1, 1)
  aspect_h_over_w = (height - 1) / max(width - 1, 1)
  t = theta[:, :, :, None, None]
  cols = half_w + t[:, 0, 0] * x + t[:, 0, 1] * y * aspect_w_over_h + t[:, 0, 2] * half_w
  rows = half_h + t[:, 1, 0] * x * aspect_h_over_w + t[:, 1, 1] * y + t[:, 1, 2] * half_h
  return _bilinear_sample(images, rows, cols)


# ---------------------------------------------------------------------------
# Random ops: (images, rng, params) -> images, per-sample random parameters.


@_jit_with_static_params
def brightness(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
  """Adds (U - 0.5) * params.brightness per sample."""
  params = as_params(params)
  _check_float_nhwc(images)
  offsets = (_uniform(rng, images.shape[0]) - 0.5) * params.brightness
  return adjust_brightness(images, offsets)


@_jit_with_static_params
def saturation(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
  """Scales deviations from the channel mean by U * params.saturation per sample."""
  params = as_params(params)
  _check_float_nhwc(images)
  factors = _uniform(rng, images.shape[0]) * params.saturation
  return adjust_saturation(images, factors)


@_jit_with_static_params
def contrast(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
  """Scales deviations from the sample mean by U + params.contrast per sample."""
  params = as_params(params)
  _check_float_nhwc(images)
  factors = _uniform(rng, images.shape[0]) + params.contrast
  return adjust_contrast(images, factors)


@_jit_with_static_params
def color(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
  """Applies brightness, saturation and contrast in that order (the 'color' family)."""
  brightness_rng, saturation_rng, contrast_rng = jax.random.split(rng, 3)
  images = brightness(images, brightness_rng, params)
  images = saturation(images, saturation_rng, params)
  return contrast(images, contrast_rng, params)


def max_crop_shift(size: int, params: DSAConfig | None = None) -> int:
  """Largest translation of `crop` for an image side of `size` pixels."""
  return int(size * as_params(params).crop_ratio + 0.5)


def cutout_side(size: int, params: DSAConfig | None = None) -> int:
  """Side of the `cutout` square for an image side of `size` pixels."""
  return int(size * as_params(params).cutout_ratio + 0.5)


@_jit_with_static_params
def crop(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
  """Translates each sample by random integer shifts in [-max, max] per axis, zero fill."""
  params = as_params(params)
  _check_float_nhwc(images)
  batch, height, width, _ = images.shape
  max_shift = jnp.array([max_crop_shift(height, params), max_crop_shift(width, params)], jnp.int32)
  shifts = jax.random.randint(rng, (batch, 2), -max_shift, max_shift + 1, jnp.int32)
  return translate(images, shifts)


@_jit_with_static_params
def cutout(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
  """Zeros a random square of side int(H * cutout_ratio + 0.5) per sample."""
  params = as_params(params)
  _check_float_nhwc(images)
  batch, height, width, _ = images.shape
  size = (cutout_side(height, params), cutout_side(width, params))
  # As in the reference: the centre ranges over [0, H + 1 - side % 2).
  center_limit = jnp.array([height + 1 - size[0] % 2, width + 1 - size[1] % 2], jnp.int32)
  centers = jax.random.randint(rng, (batch, 2), 0, center_limit, jnp.int32)
  return cut_out(images, centers, size)


@_jit_with_static_params
def flip(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
  """Flips each sample horizontally with probability params.flip_prob."""
  params = as_params(params)
  _check_float_nhwc(images)
  should_flip = _uniform(rng, images.shape[0]) < params.flip_prob
  return flip_where(images, should_flip)


@_jit_with_static_params
def scale(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
  """Scales the sampling grid by sx, sy ~ U[1/params.scale, params.scale] per sample."""
  params = as_params(params)
  _check_float_nhwc(images)
  rng_x, rng_y = jax.random.split(rng)
  batch = images.shape[0]
  low, high = 1.0 / params.scale, params.scale
  theta = scale_matrices(_uniform(rng_x, batch, low, high), _uniform(rng_y, batch, low, high))
  return affine_warp(images, theta)


@_jit_with_static_params
def rotate(images: Array, rng: PRNGKey, params: DSAConfig | None = None) -> Array:
  """Rotates each sample by an angle ~ U[-rotate_degrees, rotate_degrees]."""
  params = as_params(params)
  _check_float_nhwc(images)
  max_angle = params.rotate_degrees * math.pi / 180.0
  angles = _uniform(rng, images.shape[0], -max_angle, max_angle)
  return affine_warp(images, rotation_matrices(angles))


# ---------------------------------------------------------------------------
# Strategy.

AugmentFn = Callable[[Array, PRNGKey, DSAConfig | None], Array]

FAMILIES: Mapping[str, AugmentFn] = {
  "color": color,
  "crop": crop,
  "cutout": cutout,
  "flip": flip,
  "scale": scale,
  "rotate": rotate,
  # Single colour ops, handy on their own (not in the reference strategies).
  "brightness": brightness,
  "saturation": saturation,
  "contrast": contrast,
}


def parse_strategy(strategy: str) -> tuple[str, ...]:
  """Splits 'color_crop_...' into family names; '' or 'none' gives ()."""
  if strategy.strip().lower() in ("", "none"):
    return ()
  names = tuple(strategy.strip().split("_"))
  for name in names:
    if name not in FAMILIES:
      raise CCDDError(
        f"unknown DSA augmentation {name!r} in strategy {strategy!r}; known: {', '.join(FAMILIES)}"
      )
  return names


def strategy_list(listing: str, default: str, field: str) -> list[str]:
  """The DSA strategies a comma-separated `listing` names ("" = [`default`]); `field` names
  the list in errors."""
  return lists.named_list(listing, default, field, parse_strategy)


def augment(
  images: Array,
  rng: PRNGKey,
  params: DSAConfig | None = None,
  strategy: str | None = None,
  family_rng: PRNGKey | None = None,
) -> Array:
  """Applies one randomly chosen DSA family of `strategy` (default params.strategy).

  Siamese: the same `rng` on batches of the same shape applies exactly the same
  family and per-sample parameters, so pass one key to augment a real and a
  synthetic batch identically. The family is chosen with `lax.switch`, so the
  function traces once and works under jit, vmap, scan and (nested) grad;
  under vmap over keys the switch becomes a select that evaluates every family.
  Pass a `family_rng` that is not vmapped (shared by all vmapped members) to
  keep a real switch there: it then picks the family, `rng` the parameters.
  """
  params = as_params(params)
  names = parse_strategy(params.strategy if strategy is None else strategy)
  images = jnp.asarray(images)
  _check_float_nhwc(images)
  if not names:
    return images
  if family_rng is None:
    family_rng, rng = jax.random.split(rng)
  return _augment_with_families(images, rng, family_rng, params=params, names=names)


def augment_keeping(
  images: Array,
  rng: PRNGKey,
  params: DSAConfig | None = None,
  keep: Array | None = None,
  family_rng: PRNGKey | None = None,
) -> Array:
  """`augment`, except that pixels where `keep` (broadcastable to images) is nonzero stay.

  Trigger-safe DSA: with `keep` = 1 on the stamped corner, the trigger
  stays exactly where and what verification shows, while the rest is augmented
  as usual (same family and parameters as `augment` with the same keys).
  """
  out = augment(images, rng, params, family_rng=family_rng)
  return out if keep is None else jnp.where(keep > 0, jnp.asarray(images), out)


# Jitted so that eager calls reuse one compiled switch instead of re-tracing the
# branches every call; inside an outer trace it is simply inlined.
@functools.partial(jax.jit, static_argnames=("params", "names"))
def _augment_with_families(
  images: Array, op_rng: PRNGKey, family_rng: PRNGKey, params: DSAConfig, names: tuple[str, ...]
) -> Array:
  branches = [functools.partial(FAMILIES[name], params=params) for name in names]
  if len(branches) == 1:
    return branches[0](images, op_rng)
  index = jax.random.randint(family_rng, (), 0, len(branches))
  return lax.switch(index, branches, images, op_rng)
