"""The DC/MTT benchmark networks: shapes, channel masks, batch norm, meta-gradients."""

import chex
from conftest import config_section
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.method import distill
from ccdd_jax.method import models

NO_AUG = config_section("dsa", strategy="none")
IMAGE_SHAPE = (32, 32, 3)

# Narrow variants (same architecture, width 8) keep the second-order meta-gradient cheap.
NARROW = {
  "resnet18": lambda: models.ResNet18(num_classes=10, conv_impl="im2col", width=8),
  "vgg11": lambda: models.VGG11(num_classes=10, conv_impl="im2col", width=8),
  "alexnet": lambda: models.AlexNet(num_classes=10),
}
ZOO = {
  "resnet18": lambda: models.ResNet18(num_classes=10, conv_impl="im2col"),
  "vgg11": lambda: models.VGG11(num_classes=10, conv_impl="im2col"),
  "vgg11_batch_lax": lambda: models.VGG11(num_classes=10, norm="batch", conv_impl="lax"),
  "alexnet": lambda: models.AlexNet(num_classes=10),
}
FEATURE_SHAPES = {
  "resnet18": (2, 4, 4, 512),
  "vgg11_batch_lax": (2, 2, 2, 512),
  "alexnet": (2, 8, 8, 192),
}


def init(net):
  """Jitted `init_params` (eager init of the big networks is slow on CPU)."""
  return jax.jit(lambda rng: models.init_params(net, IMAGE_SHAPE, rng))(jax.random.PRNGKey(0))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg11_batch_lax", "alexnet"])
def test_logits_features_and_channel_mask(name):
  net = ZOO[name]()
  params = init(net)
  x = jax.random.normal(jax.random.PRNGKey(1), (2,) + IMAGE_SHAPE)
  apply = models.make_apply(net)
  half = FEATURE_SHAPES[name][-1] // 2
  mask = jnp.ones(FEATURE_SHAPES[name][-1]).at[:half].set(0.0)

  @jax.jit
  def run(params, x):
    return (
      apply(params, x),
      apply(params, x, return_features=True),
      apply(params, x, channel_mask=mask, return_features=True),
    )

  plain, (logits, features), (masked_logits, masked) = run(params, x)
  chex.assert_shape([plain, logits], (2, 10))
  np.testing.assert_allclose(plain, logits, rtol=1e-6)
  chex.assert_shape(features, FEATURE_SHAPES[name])
  assert float(jnp.max(features[..., :half])) > 0
  assert float(jnp.max(jnp.abs(masked[..., :half]))) == 0.0
  np.testing.assert_allclose(masked[..., half:], features[..., half:], rtol=1e-5, atol=1e-6)
  assert not np.allclose(masked_logits, logits)


def test_batch_stats_norm_normalises_over_the_batch():
  norm = models.BatchStatsNorm()
  x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5, 6))
  params = norm.init(jax.random.PRNGKey(1), x)
  y = norm.apply(params, x)
  np.testing.assert_allclose(jnp.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(jnp.var(y, axis=(0, 1, 2)), 1.0, rtol=1e-3)
  # Unlike instance norm, single samples keep their offsets relative to the batch.
  assert float(jnp.max(jnp.abs(jnp.mean(y, axis=(1, 2))))) > 1e-2


def test_conv3x3_without_bias_matches_between_implementations():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 3))
  lax_conv = models.Conv3x3(4, "lax", use_bias=False)
  params = lax_conv.init(jax.random.PRNGKey(1), x)
  assert "bias" not in params["params"]
  np.testing.assert_allclose(
    lax_conv.apply(params, x),
    models.Conv3x3(4, "im2col", use_bias=False).apply(params, x),
    rtol=1e-5,
    atol=1e-5,
  )


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "vgg11", "alexnet"])
def test_meta_loss_gradient_reaches_the_images(name):
  net = NARROW[name]()
  flat, unravel = ravel_pytree(init(net))
  apply_flat = lambda w, x: net.apply({"params": unravel(w)}, x)
  cfg = config_section("distill", syn_steps=2, batch_syn=0, beta=0.0)
  meta = distill.make_meta_loss(cfg, apply_flat, NO_AUG, num_syn=4)
  images = jax.random.normal(jax.random.PRNGKey(1), (4,) + IMAGE_SHAPE)
  labels = jnp.array([0, 1, 2, 3])
  target = flat + 0.01
  loss_fn = lambda imgs: meta(
    imgs, jnp.float32(0.01), labels, flat, target, flat, target, jax.random.PRNGKey(3)
  )
  loss, grad = jax.jit(jax.value_and_grad(loss_fn))(images)
  assert np.isfinite(float(loss))
  chex.assert_shape(grad, images.shape)
  assert bool(jnp.all(jnp.isfinite(grad)))
  assert float(jnp.max(jnp.abs(grad))) > 0


@pytest.mark.slow
def test_registry_builds_every_architecture_and_rejects_bad_names():
  model_cfg = config_section("model", conv_impl="lax")
  for arch, cls in [
    ("resnet18:batch", models.ResNet18),
    ("vgg11:batch", models.VGG11),
    ("alexnet", models.AlexNet),
    ("convnet:none", models.ConvNet),
  ]:
    assert isinstance(models.build(arch, 10, model_cfg), cls)
  assert models.build("vgg11", 10, model_cfg).norm == "instance"
  assert models.build("convnet", 10, model_cfg).norm == model_cfg.norm
  assert models.build("resnet18", 10, model_cfg, width=8).width == 8
  assert models.parse_arch("resnet18:batch") == ("resnet18", "batch")
  assert models.parse_arch("alexnet") == ("alexnet", "")
  with pytest.raises(CCDDError, match="available: convnet, resnet18, vgg11, alexnet"):
    models.build("lenet", 10, model_cfg)
  with pytest.raises(CCDDError, match="resnet18 has no norm 'layer': use instance or batch"):
    models.build("resnet18:layer", 10, model_cfg)
  with pytest.raises(CCDDError, match="alexnet has no norm 'instance'"):
    models.parse_arch("alexnet:instance")
  assert models.eval_architectures("", "convnet") == ["convnet"]
  assert models.eval_architectures("alexnet, convnet:none,convnet", "convnet") == [
    "convnet",
    "alexnet",
    "convnet:none",
  ]
  net = models.build_network("convnet", 10, IMAGE_SHAPE, model_cfg)
  flat = ravel_pytree(net.init_params(jax.random.PRNGKey(0), 1))[0]
  images = jnp.ones((2,) + IMAGE_SHAPE)
  params = jax.tree_util.tree_map(lambda x: x[0], net.init_params(jax.random.PRNGKey(0), 1))
  np.testing.assert_allclose(net.apply_flat(flat, images), net.apply(params, images), rtol=1e-6)


@pytest.mark.slow
def test_convnet_depth4_on_64x64():
  cfg = config_section("model", width=8, depth=4, norm="instance", conv_impl="lax")
  net = models.build("convnet", 10, cfg)
  params = models.init_params(net, (64, 64, 3), jax.random.PRNGKey(0))
  logits, features = jax.jit(lambda p, x: net.apply({"params": p}, x, return_features=True))(
    params, jnp.ones((2, 64, 64, 3))
  )
  chex.assert_shape(logits, (2, 10))
  chex.assert_shape(features, (2, 8, 8, 8))
  chex.assert_shape(params["head"]["kernel"], (4 * 4 * 8, 10))
