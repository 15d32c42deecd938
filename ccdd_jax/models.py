"""Networks used as experts, students and evaluation models (Flax linen).

`ConvNet` follows the MTT reference: `depth` blocks of Conv3x3(width) ->
instance norm (GroupNorm with one group per channel, eps 1e-5, affine) ->
ReLU -> 2x2 average pooling, then one dense layer to the logits.

Convolutions can be computed with `lax.conv_general_dilated` ("lax") or as
im2col patches followed by a matmul ("im2col"). Both give the same numbers;
XLA:CPU differentiates the im2col form much faster inside a rolled
`lax.scan`, so "auto" picks im2col on CPU and lax convolutions elsewhere.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ccdd_jax import CCDDError

Params = Any


def resolve_conv_impl(conv_impl: str) -> str:
  """Maps "auto" to the convolution implementation that is fastest here."""
  if conv_impl == "auto":
    return "im2col" if jax.default_backend() == "cpu" else "lax"
  if conv_impl not in ("lax", "im2col"):
    raise CCDDError(f"unknown model.conv_impl {conv_impl!r}: use auto, lax or im2col")
  return conv_impl


class Conv3x3(nn.Module):
  """3x3 'SAME' convolution with bias; same parameters for both implementations."""
  features: int
  conv_impl: str = "lax"

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, in_features, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    if self.conv_impl == "im2col":
      # Patches come out feature-major: (in_features, kh, kw).
      patches = jax.lax.conv_general_dilated_patches(
          x, (3, 3), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      matrix = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, self.features)
      y = patches @ matrix
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class InstanceNorm(nn.Module):
  """Per-sample, per-channel normalisation over H and W with an affine map."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class ConvNet(nn.Module):
  """The MTT/DC ConvNet; `channel_mask` zeroes channels of the last conv block."""
  num_classes: int
  width: int = 128
  depth: int = 3
  norm: str = "instance"
  conv_impl: str = "lax"

  @nn.compact
  def __call__(self, x, channel_mask=None, return_features=False):
    for block in range(self.depth):
      x = Conv3x3(self.width, self.conv_impl, name=f"conv_{block}")(x)
      if self.norm == "instance":
        x = InstanceNorm(name=f"norm_{block}")(x)
      elif self.norm != "none":
        raise CCDDError(f"unknown model.norm {self.norm!r}: use instance or none")
      x = nn.relu(x)
      if block == self.depth - 1 and channel_mask is not None:
        x = x * channel_mask  # Fine-pruning masks the last conv layer's channels.
      features = x
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    logits = nn.Dense(self.num_classes, name="head")(x)
    if return_features:
      return logits, features
    return logits


def build_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the network a config names."""
  name = model_config.name
  if name == "convnet":
    return ConvNet(num_classes=num_classes, width=model_config.width,
                   depth=model_config.depth, norm=model_config.norm,
                   conv_impl=resolve_conv_impl(model_config.conv_impl))
  raise CCDDError(f"unknown model.name {name!r}: available: convnet")


def init_params(model: nn.Module, image_shape, rng: jax.Array) -> Params:
  """Initial parameters for images of `image_shape` (H, W, C)."""
  dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is on.
  return model.init(rng, jnp.zeros((1,) + tuple(image_shape), dtype))["params"]


def make_apply(model: nn.Module) -> Callable[..., jax.Array]:
  """Pure `apply(params, images, **kw) -> logits` for a model."""
  def apply(params, images, **kwargs):
    return model.apply({"params": params}, images, **kwargs)
  return apply
