"""ConvNet: shapes, and the three convolution implementations agree."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.method import models


# im2col's compilations and the larger shapes take 4-12 s each on 2 CPU cores: slow.
@pytest.mark.parametrize("conv_impl", [pytest.param("im2col", marks=pytest.mark.slow), "shift"])
@pytest.mark.parametrize(
  "shape,depth",
  [
    ((8, 8, 1), 2),
    pytest.param((12, 12, 1), 3, marks=pytest.mark.slow),
    pytest.param((32, 32, 3), 3, marks=pytest.mark.slow),
  ],
)
def test_convnet_shapes_and_matmul_convolutions_match_lax(shape, depth, conv_impl):
  x = jax.random.normal(jax.random.PRNGKey(1), (4,) + shape)
  lax_net = models.ConvNet(num_classes=10, width=8, depth=depth, conv_impl="lax")
  col_net = models.ConvNet(num_classes=10, width=8, depth=depth, conv_impl=conv_impl)
  params = jax.jit(lambda r: models.init_params(lax_net, shape, r))(jax.random.PRNGKey(0))
  # Jitted: op-by-op dispatch of these networks costs more on CPU than one compilation.
  out_lax = jax.jit(lax_net.apply)({"params": params}, x)
  out_col = jax.jit(col_net.apply)({"params": params}, x)
  chex.assert_shape(out_lax, (4, 10))
  np.testing.assert_allclose(out_lax, out_col, rtol=1e-4, atol=1e-4)
  # One gradient agrees too.
  loss = lambda net: lambda p: jnp.sum(net.apply({"params": p}, x) ** 2)
  chex.assert_trees_all_close(
    jax.jit(jax.grad(loss(lax_net)))(params),
    jax.jit(jax.grad(loss(col_net)))(params),
    rtol=2e-3,
    atol=2e-4,
  )


def test_instance_norm_normalises_each_channel_per_sample():
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 4))
  norm = models.InstanceNorm()
  y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
  np.testing.assert_allclose(y.mean(axis=(1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.std(axis=(1, 2)), 1.0, atol=1e-3)


@pytest.mark.parametrize("conv_impl", ["lax", "shift"])
def test_channel_mask_and_features(conv_impl):
  # "shift" runs channel-major inside; features come back NHWC all the same.
  net = models.ConvNet(num_classes=3, width=4, depth=2, conv_impl=conv_impl)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  params = jax.jit(lambda r: models.init_params(net, (8, 8, 1), r))(jax.random.PRNGKey(0))
  mask = jnp.array([1.0, 0.0, 1.0, 0.0])
  apply = lambda n: jax.jit(lambda p, x, m: n.apply(p, x, channel_mask=m, return_features=True))
  logits, feats = apply(net)({"params": params}, x, mask)
  chex.assert_shape(feats, (2, 4, 4, 4))
  assert float(jnp.abs(feats[..., 1]).max()) == 0.0
  assert float(jnp.abs(feats[..., 0]).max()) > 0.0
  lax_net = models.ConvNet(num_classes=3, width=4, depth=2, conv_impl="lax")
  lax_logits, lax_feats = apply(lax_net)({"params": params}, x, mask)
  np.testing.assert_allclose(feats, lax_feats, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logits, lax_logits, rtol=1e-4, atol=1e-5)


def test_unknown_model_names_are_user_errors():
  with pytest.raises(CCDDError, match="conv_impl"):
    models.resolve_conv_impl("winograd")
