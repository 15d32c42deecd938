"""Networks used as experts, students and evaluation models (Flax linen).

`ConvNet` follows the MTT reference: `depth` blocks of Conv3x3(width) ->
instance norm (GroupNorm with one group per channel, eps 1e-5, affine) ->
ReLU -> 2x2 average pooling, then one dense layer to the logits.

Convolutions can be computed with `lax.conv_general_dilated` ("lax"), as
im2col patches from `conv_general_dilated_patches` followed by a matmul
("im2col"), or as the same matmul on nine shifted slices of the padded input
("shift", no convolution op at all). All give the same numbers. Inside a
rolled `lax.scan` XLA:CPU leaves the weight gradients of convolution ops in
a slow form (docs/performance.md), so "auto" picks a matmul form on CPU and
lax convolutions elsewhere. With "shift", `ConvNet` runs its blocks
channel-major ([C, N, H, W]) and pools by matmuls, which XLA:CPU computes
faster (same parameters, inputs and features).

`ResNet18`, `VGG11` and `AlexNet` follow the dataset-condensation benchmark
networks of DC/MTT for 32x32 inputs. Their `norm` is "instance" (the default,
used for distillation), "batch" or "none" (ResNet18 and VGG11; AlexNet has no
norm layers, as in the reference). Training loops here are pure
`apply(params, x)` functions without mutable state, so "batch" norm is
stateless: it always normalises with the CURRENT batch's per-channel mean and
variance over N, H and W (affine, no running averages). That works inside
`lax.scan`, but at test time it normalises with the test batch's statistics,
which only approximates eval-mode batch norm (that needs running statistics).
All networks take `channel_mask` (multiplies the channels of the last conv
block's post-activation features, for fine-pruning) and `return_features`
(returns (logits, those features)).
"""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import ml_collections

from ccdd_jax import CCDDError
from ccdd_jax import lists

Params = Any


def resolve_conv_impl(conv_impl: str) -> str:
  """Maps "auto" to the convolution implementation that is fastest here."""
  if conv_impl == "auto":
    return "shift" if jax.default_backend() == "cpu" else "lax"
  if conv_impl not in ("lax", "im2col", "shift"):
    raise CCDDError(f"unknown model.conv_impl {conv_impl!r}: use auto, lax, im2col or shift")
  return conv_impl


def _shift_patches(x: jax.Array, channels_first: bool) -> jax.Array:
  """im2col rows (kh, kw, in) of a 3x3 'SAME' convolution from nine shifted slices."""
  if channels_first:  # [C, N, H, W] -> [9 C, N H W]
    c, n, h, w = x.shape
    padded = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    return jnp.concatenate(
      [padded[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0
    ).reshape(9 * c, n * h * w)
  h, w = x.shape[1], x.shape[2]  # [N, H, W, C] -> [N, H, W, 9 C]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate(
    [padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1
  )


def _avg_pool_2x2_channels_first(x: jax.Array) -> jax.Array:
  """2x2 average pooling (stride 2, odd edges dropped) of [C, N, H, W] arrays.

  Written as matmuls with constant 0/0.5 pooling matrices: XLA:CPU reduces
  over the strided window axes of a reshape slowly, and computes the
  broadcast that is its gradient by fusing the gradient's producer (a col2im)
  into it four times over (1.2x on the whole digits meta-gradient,
  docs/performance.md).
  """
  c, n, h, w = x.shape
  hh, ww = h // 2, w // 2
  x = x[:, :, : 2 * hh, : 2 * ww]
  down_h = 0.5 * (jnp.arange(2 * hh)[:, None] // 2 == jnp.arange(hh)[None, :]).astype(x.dtype)
  down_w = 0.5 * (jnp.arange(2 * ww)[:, None] // 2 == jnp.arange(ww)[None, :]).astype(x.dtype)
  if hh * ww <= 16:  # One [4 hh ww, hh ww] matrix: cheapest for small maps.
    down = jnp.einsum("Hh,Ww->HWhw", down_h, down_w).reshape(4 * hh * ww, hh * ww)
    return (x.reshape(c * n, 4 * hh * ww) @ down).reshape(c, n, hh, ww)
  # Separable: 2 hh + 2 ww multiply-adds per output instead of 4 hh ww.
  return jnp.einsum("cnHw,Hh->cnhw", x @ down_w, down_h)


class Conv3x3(nn.Module):
  """3x3 'SAME' convolution (bias optional); same parameters for every implementation.

  `channels_first` (only with "shift") takes and returns [C, N, H, W] arrays.
  """

  features: int
  conv_impl: str = "lax"
  use_bias: bool = True
  channels_first: bool = False

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[0] if self.channels_first else x.shape[-1]
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (3, 3, in_features, self.features)
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    if self.channels_first:
      if self.conv_impl != "shift":
        raise ValueError(f"channels_first needs conv_impl 'shift', not {self.conv_impl!r}")
      _, n, h, w = x.shape
      y = kernel.reshape(-1, self.features).T @ _shift_patches(x, True)
      y = y.reshape(self.features, n, h, w)
      return y + bias[:, None, None, None] if self.use_bias else y
    if self.conv_impl == "shift":
      # No convolution op at all, so XLA:CPU keeps every gradient a plain matmul
      # inside a rolled scan.
      y = _shift_patches(x, False) @ kernel.reshape(-1, self.features)
    elif self.conv_impl == "im2col":
      # Patches come out feature-major: (in_features, kh, kw).
      patches = jax.lax.conv_general_dilated_patches(
        x, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
      matrix = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, self.features)
      y = patches @ matrix
    else:
      y = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
      )
    return y + bias if self.use_bias else y


class _AffineNorm(nn.Module):
  """Normalises over `reduce_axes` per channel, then an affine map per channel."""

  reduce_axes: tuple = (1, 2)
  epsilon: float = 1e-5
  channel_axis: int = -1

  @nn.compact
  def __call__(self, x):
    features = x.shape[self.channel_axis]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    if self.channel_axis != -1:
      shape = [1] * x.ndim
      shape[self.channel_axis] = features
      scale, bias = scale.reshape(shape), bias.reshape(shape)
    mean = jnp.mean(x, axis=self.reduce_axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=self.reduce_axes, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class InstanceNorm(_AffineNorm):
  """Per-sample, per-channel normalisation over H and W with an affine map."""

  reduce_axes: tuple = (1, 2)


class BatchStatsNorm(_AffineNorm):
  """Stateless batch norm: per-channel statistics of the current batch over N, H, W."""

  reduce_axes: tuple = (0, 1, 2)


def _norm(norm: str, name: str) -> Callable[[jax.Array], jax.Array]:
  """The norm layer `norm` names ("instance", "batch" or "none")."""
  if norm == "instance":
    return InstanceNorm(name=name)
  if norm == "batch":
    return BatchStatsNorm(name=name)
  if norm == "none":
    return lambda x: x
  raise CCDDError(f"unknown model.norm {norm!r}: use instance, batch or none")


def _pad(p: int):
  """Symmetric spatial padding of `p` pixels for `nn.Conv`."""
  return ((p, p), (p, p))


def _head(x, num_classes, features, return_features):
  """Flattens `x` into the dense head; returns logits (and `features` if asked)."""
  logits = nn.Dense(num_classes, name="head")(x.reshape(x.shape[0], -1))
  if return_features:
    return logits, features
  return logits


class ConvNet(nn.Module):
  """The MTT/DC ConvNet; `channel_mask` zeroes channels of the last conv block.

  `channels_first` (None = with "shift") runs the blocks channel-major, on
  [C, N, H, W] arrays; inputs, features and parameters stay the same.
  """

  num_classes: int
  width: int = 128
  depth: int = 3
  norm: str = "instance"
  conv_impl: str = "lax"
  channels_first: bool | None = None

  @nn.compact
  def __call__(self, x, channel_mask=None, return_features=False):
    if self.norm not in ("instance", "none"):
      raise CCDDError(f"unknown model.norm {self.norm!r}: use instance or none")
    # Channel-major, XLA:CPU reduces the norm over contiguous H W rows, pools by
    # matmuls and needs no transposed copy for a gradient matmul: meta-gradients
    # 1.9x (digits) and 1.3x (CIFAR-10 IPC 1) faster than NHWC (docs/performance.md).
    channels_first = (
      self.conv_impl == "shift" if self.channels_first is None else self.channels_first
    )
    if channels_first:
      x = jnp.transpose(x, (3, 0, 1, 2))
    for block in range(self.depth):
      x = Conv3x3(self.width, self.conv_impl, channels_first=channels_first, name=f"conv_{block}")(
        x
      )
      if self.norm == "instance":
        x = (
          InstanceNorm(reduce_axes=(2, 3), channel_axis=0, name=f"norm_{block}")(x)
          if channels_first
          else InstanceNorm(name=f"norm_{block}")(x)
        )
      x = nn.relu(x)
      if block == self.depth - 1 and channel_mask is not None:
        # Fine-pruning masks the last conv layer's channels.
        x = x * (channel_mask[:, None, None, None] if channels_first else channel_mask)
      features = x
      if channels_first:
        x = _avg_pool_2x2_channels_first(x)
      else:
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    if channels_first:
      x = jnp.transpose(x, (1, 2, 3, 0))
      features = jnp.transpose(features, (1, 2, 3, 0))
    x = x.reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes, name="head")(x)
    if return_features:
      return logits, features
    return logits


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 convs with norm, projection shortcut when the shape changes."""

  features: int
  stride: int = 1
  norm: str = "instance"
  conv_impl: str = "lax"

  @nn.compact
  def __call__(self, x):
    if self.stride == 1:
      y = Conv3x3(self.features, self.conv_impl, use_bias=False, name="conv_0")(x)
    else:
      y = nn.Conv(
        self.features, (3, 3), (self.stride, self.stride), _pad(1), use_bias=False, name="conv_0"
      )(x)
    y = nn.relu(_norm(self.norm, "norm_0")(y))
    y = Conv3x3(self.features, self.conv_impl, use_bias=False, name="conv_1")(y)
    y = _norm(self.norm, "norm_1")(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = nn.Conv(
        self.features,
        (1, 1),
        (self.stride, self.stride),
        "VALID",
        use_bias=False,
        name="shortcut_conv",
      )(x)
      shortcut = _norm(self.norm, "shortcut_norm")(shortcut)
    return nn.relu(y + shortcut)


class ResNet18(nn.Module):
  """DC's ResNet18 for 32x32: 3x3 stem, 4 stages of 2 basic blocks, global average pooling."""

  num_classes: int
  norm: str = "instance"
  conv_impl: str = "lax"
  width: int = 64  # Stem/first-stage width; DC uses 64 (stages: 1x, 2x, 4x, 8x).

  @nn.compact
  def __call__(self, x, channel_mask=None, return_features=False):
    x = Conv3x3(self.width, self.conv_impl, use_bias=False, name="stem_conv")(x)
    x = nn.relu(_norm(self.norm, "stem_norm")(x))
    for stage in range(4):
      width = self.width * 2**stage
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, stride, self.norm, self.conv_impl, name=f"stage{stage}_block{block}")(
          x
        )
    if channel_mask is not None:
      x = x * channel_mask  # Fine-pruning masks the last block's channels.
    features = x
    x = jnp.mean(x, axis=(1, 2))
    return _head(x, self.num_classes, features, return_features)


VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
  """DC's VGG11: 3x3 conv -> norm -> ReLU blocks with 2x2 max pooling, then a dense head."""

  num_classes: int
  norm: str = "instance"
  conv_impl: str = "lax"
  width: int = 64  # First conv's width; DC uses 64 (the others scale with it).

  @nn.compact
  def __call__(self, x, channel_mask=None, return_features=False):
    last_conv = max(i for i, v in enumerate(VGG11_CFG) if v != "M")
    features = None
    for i, v in enumerate(VGG11_CFG):
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      v = v * self.width // 64
      if i == 0 and x.shape[-1] == 1:  # As DC: 28x28 grey images are padded to 34x34.
        x = nn.Conv(v, (3, 3), padding=_pad(3), name=f"conv_{i}")(x)
      else:
        x = Conv3x3(v, self.conv_impl, name=f"conv_{i}")(x)
      x = nn.relu(_norm(self.norm, f"norm_{i}")(x))
      if i == last_conv:
        if channel_mask is not None:
          x = x * channel_mask  # Fine-pruning masks the last conv layer's channels.
        features = x
    return _head(x, self.num_classes, features, return_features)


class AlexNet(nn.Module):
  """DC's AlexNet for 32x32 (no norm layers): five convs, three 2x2 max pools, dense head."""

  num_classes: int

  @nn.compact
  def __call__(self, x, channel_mask=None, return_features=False):
    pad = 4 if x.shape[-1] == 1 else 2  # As DC: 28x28 grey images get 4, RGB 32x32 gets 2.
    x = nn.relu(nn.Conv(128, (5, 5), padding=_pad(pad), name="conv_0")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(192, (5, 5), padding=_pad(2), name="conv_1")(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Conv(256, (3, 3), padding=_pad(1), name="conv_2")(x))
    x = nn.relu(nn.Conv(192, (3, 3), padding=_pad(1), name="conv_3")(x))
    x = nn.relu(nn.Conv(192, (3, 3), padding=_pad(1), name="conv_4")(x))
    if channel_mask is not None:
      x = x * channel_mask  # Fine-pruning masks the last conv layer's channels.
    features = x
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return _head(x, self.num_classes, features, return_features)


# The model registry: every architecture by name, with the norms it accepts
# (the first is its default). One function builds them all (`build`), from
# "name" or "name:norm" strings, for distillation and for evaluation.
ARCHITECTURES = {
  "convnet": ("instance", "none"),
  "resnet18": ("instance", "batch", "none"),
  "vgg11": ("instance", "batch", "none"),
  "alexnet": ("none",),  # DC's AlexNet has no norm layers.
}


def parse_arch(arch: str) -> tuple[str, str]:
  """("resnet18", "batch") from "resnet18:batch"; the norm is "" where none is given."""
  name, _, norm = arch.strip().partition(":")
  if name not in ARCHITECTURES:
    raise CCDDError(
      f"unknown architecture {arch!r}: available: {', '.join(ARCHITECTURES)}, "
      "optionally with :<norm>"
    )
  if norm and norm not in ARCHITECTURES[name]:
    raise CCDDError(
      f"architecture {name} has no norm {norm!r}: use {' or '.join(ARCHITECTURES[name])}"
    )
  return name, norm


def eval_architectures(eval_models: str, primary: str, field: str = "eval.models") -> list[str]:
  """The architectures a list such as `eval.models` names ("" = `primary` only), `primary`
  first; `field` names the list in errors."""
  archs = lists.named_list(eval_models, primary, field, parse_arch)
  return sorted(archs, key=lambda a: a != primary)


def build(
  arch: str, num_classes: int, model_config: ml_collections.ConfigDict, width: int = 0
) -> nn.Module:
  """The network `arch` ("name" or "name:norm") names, for `num_classes` classes.

  The ConvNet takes width, depth and (by default) norm from `model_config`;
  the other architectures take `width` (0 = DC's 64) and default to their
  first accepted norm. Every one takes `model_config.conv_impl`.
  """
  name, norm = parse_arch(arch)
  conv_impl = resolve_conv_impl(model_config.conv_impl)
  if name == "convnet":
    return ConvNet(
      num_classes=num_classes,
      width=model_config.width,
      depth=model_config.depth,
      norm=norm or model_config.norm,
      conv_impl=conv_impl,
    )
  if name == "alexnet":
    return AlexNet(num_classes=num_classes)
  if not norm:
    norm = model_config.norm if name == model_config.name else ARCHITECTURES[name][0]
  widths = {"width": width} if width else {}
  cls = {"resnet18": ResNet18, "vgg11": VGG11}[name]
  return cls(num_classes=num_classes, norm=norm, conv_impl=conv_impl, **widths)


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """One architecture on one image shape: its Flax module, pure apply and parameters."""

  arch: str
  module: nn.Module
  image_shape: tuple

  @functools.cached_property
  def apply(self) -> Callable[..., jax.Array]:
    """Pure `apply(params, images, **kw) -> logits`, one function object per network."""
    return make_apply(self.module)

  @functools.cached_property
  def apply_flat(self) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`apply(flat_params, images) -> logits` on a `ravel_pytree` vector of the parameters."""
    like = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self.like_params())
    unravel = ravel_pytree(like)[1]
    return lambda flat, images: self.apply(unravel(flat), images)

  def init_params(self, rng: jax.Array, count: int) -> Params:
    """`count` stacked initial parameter trees."""
    init = lambda r: init_params(self.module, self.image_shape, r)
    return jax.jit(jax.vmap(init))(jax.random.split(rng, count))

  def like_params(self) -> Params:
    """Shapes and dtypes of one parameter tree."""
    return jax.eval_shape(lambda: init_params(self.module, self.image_shape, jax.random.PRNGKey(0)))


def build_network(
  arch: str,
  num_classes: int,
  image_shape: tuple,
  model_config: ml_collections.ConfigDict,
  width: int = 0,
) -> Network:
  """`build`, wrapped with its image shape as a `Network`."""
  return Network(arch, build(arch, num_classes, model_config, width), tuple(image_shape))


def init_params(model: nn.Module, image_shape, rng: jax.Array) -> Params:
  """Initial parameters for images of `image_shape` (H, W, C)."""
  dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is on.
  return model.init(rng, jnp.zeros((1,) + tuple(image_shape), dtype))["params"]


def make_apply(model: nn.Module) -> Callable[..., jax.Array]:
  """Pure `apply(params, images, **kw) -> logits` for a model."""

  def apply(params, images, **kwargs):
    return model.apply({"params": params}, images, **kwargs)

  return apply
