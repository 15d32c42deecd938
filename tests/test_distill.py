"""Trajectory matching: the scan, the loss, and its gradient."""

import chex
from conftest import config_section
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax import distill
from ccdd_jax import inner_loop
from ccdd_jax import models

NO_AUG = config_section("dsa", strategy="none")


def enable_x64():
  """float64 for finite differences (jax.enable_x64 on new jax, experimental on old)."""
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64 as legacy  # pylint: disable=g-import-not-at-top

  return legacy()


def tiny_problem(dtype=jnp.float32):
  net = models.ConvNet(num_classes=3, width=4, depth=1, conv_impl="lax")
  params = models.init_params(net, (4, 4, 1), jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda p: p.astype(dtype), params)
  flat, unravel = ravel_pytree(params)
  apply_flat = lambda w, x: net.apply({"params": unravel(w)}, x)
  images = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 4, 1), dtype)
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  return apply_flat, flat, images, labels


def distill_config(**kw):
  return config_section(
    "distill",
    **{
      **dict(
        syn_steps=4,
        batch_syn=0,
        beta=0.0,
        expert_epochs=1,
        max_start_epoch=0,
        lr_img=1.0,
        lr_lr=1e-5,
        lr_teacher=0.05,
        iterations=2,
        unroll="auto",
        remat="none",
      ),
      **kw,
    },
  )


def test_scan_student_equals_python_loop():
  apply_flat, w0, images, labels = tiny_problem()
  loss = lambda w, _: inner_loop.cross_entropy(apply_flat(w, images), labels)
  lrs = jnp.array([0.1, 0.05, 0.2, 0.1])
  w_scan, _, losses = inner_loop.sgd_scan(loss, w0, jnp.zeros(4), lrs)
  w = w0
  for lr in lrs:
    w = w - lr * jax.grad(loss)(w, None)
  np.testing.assert_allclose(w_scan, w, rtol=1e-5, atol=1e-6)
  chex.assert_shape(losses, (4,))


def test_momentum_and_weight_decay_follow_torch_sgd():
  w0 = jnp.array([1.0, -2.0])
  loss = lambda w, _: jnp.sum(w**2)
  w_scan, _, _ = inner_loop.sgd_scan(
    loss, w0, jnp.zeros(3), jnp.full(3, 0.1), momentum=0.9, weight_decay=0.01
  )
  w, v = np.array([1.0, -2.0]), np.zeros(2)
  for _ in range(3):
    g = 2 * w + 0.01 * w
    v = 0.9 * v + g
    w = w - 0.1 * v
  np.testing.assert_allclose(w_scan, w, rtol=1e-6)


def test_matching_loss_is_zero_when_student_lands_on_target():
  apply_flat, w0, images, labels = tiny_problem()
  cfg = distill_config()
  meta = distill.make_meta_loss(cfg, apply_flat, NO_AUG, num_syn=6)
  rng = jax.random.PRNGKey(3)
  # Target = where the student itself lands, so the loss must be exactly 0.
  loss_fn = lambda w, _: inner_loop.cross_entropy(apply_flat(w, images), labels)
  target, _, _ = inner_loop.sgd_scan(loss_fn, w0, jnp.zeros(4), jnp.full(4, 0.05))
  value = meta(images, jnp.float32(0.05), labels, w0, target, w0, target, rng)
  assert float(value) < 1e-10
  # And it is the normalised distance otherwise (eq. 10, beta = 0).
  other = target + 0.01
  value = meta(images, jnp.float32(0.05), labels, w0, other, w0, other, rng)
  expected = jnp.sum((target - other) ** 2) / jnp.sum((w0 - other) ** 2)
  np.testing.assert_allclose(value, expected, rtol=1e-3)


def test_beta_adds_the_twin_term():
  apply_flat, w0, images, labels = tiny_problem()
  rng = jax.random.PRNGKey(3)
  target, twin_target = w0 + 0.02, w0 - 0.03
  base = distill.make_meta_loss(distill_config(), apply_flat, NO_AUG, 6)
  with_twin = distill.make_meta_loss(distill_config(beta=0.5), apply_flat, NO_AUG, 6)
  args = (images, jnp.float32(0.05), labels, w0, target)
  l0 = base(*args, w0, twin_target, rng)
  l_twin = base(images, jnp.float32(0.05), labels, w0, twin_target, w0, twin_target, rng)
  l1 = with_twin(*args, w0, twin_target, rng)
  np.testing.assert_allclose(l1, l0 + 0.5 * l_twin, rtol=1e-5)


def test_image_gradient_matches_finite_differences():
  with enable_x64():
    apply_flat, w0, images, labels = tiny_problem(jnp.float64)
    cfg = distill_config(syn_steps=3)
    meta = distill.make_meta_loss(cfg, apply_flat, NO_AUG, num_syn=6)
    target = w0 + 0.05 * jax.random.normal(jax.random.PRNGKey(5), w0.shape, jnp.float64)
    rng = jax.random.PRNGKey(3)
    f = lambda imgs, lr: meta(imgs, lr, labels, w0, target, w0, target, rng)
    lr = jnp.float64(0.1)
    g_img, g_lr = jax.grad(f, argnums=(0, 1))(images, lr)
    eps = 1e-5
    for idx in [(0, 0, 0, 0), (3, 2, 1, 0), (5, 3, 3, 0)]:
      bump = jnp.zeros_like(images).at[idx].set(eps)
      fd = (f(images + bump, lr) - f(images - bump, lr)) / (2 * eps)
      np.testing.assert_allclose(g_img[idx], fd, rtol=1e-4, atol=1e-9)
    fd_lr = (f(images, lr + eps) - f(images, lr - eps)) / (2 * eps)
    np.testing.assert_allclose(g_lr, fd_lr, rtol=1e-4)


def test_distill_reduces_matching_loss_and_checks_epochs():
  apply_flat, w0, images, labels = tiny_problem()
  loss_fn = lambda w, _: inner_loop.cross_entropy(apply_flat(w, images), labels)
  # An "expert" trained on the images themselves; start from a perturbed set.
  w1, _, _ = inner_loop.sgd_scan(loss_fn, w0, jnp.zeros(8), jnp.full(8, 0.05))
  expert = np.stack([np.stack([w0, w1])])
  cfg = distill_config(iterations=30, lr_img=10.0, expert_epochs=1)
  noisy = images + 0.5 * jax.random.normal(jax.random.PRNGKey(9), images.shape)
  out, lr, losses = distill.distill(
    cfg,
    apply_flat,
    NO_AUG,
    np.asarray(noisy),
    np.asarray(labels),
    (expert, expert),
    jax.random.PRNGKey(0),
  )
  chex.assert_shape(losses, (30, 3))
  assert np.mean(losses[-5:, 0]) < np.mean(losses[:5, 0])
  np.testing.assert_allclose(losses[:, 0], losses[:, 1])  # beta = 0: no twin term.
  chex.assert_shape(out, images.shape)
  with pytest.raises(CCDDError, match="exceeds"):
    distill.distill(
      distill_config(max_start_epoch=1),
      apply_flat,
      NO_AUG,
      np.asarray(images),
      np.asarray(labels),
      (expert, expert),
      jax.random.PRNGKey(0),
    )


def test_init_synthetic_real_images_and_trigger_slots():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(60, 8, 8, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(3), 20)
  patterns = np.full((2, 4, 4, 1), 7, np.uint8)
  imgs, labs, trig = distill.init_synthetic(
    images,
    labels,
    3,
    4,
    rng,
    patterns=patterns,
    pattern_labels=np.array([1, 1]),
    triggers_per_pattern=1,
  )
  assert np.bincount(labs).tolist() == [4, 4, 4]
  assert trig.sum() == 2 and set(labs[trig]) == {1}
  assert np.all(imgs[trig][:, :4, :4] == 7)
  with pytest.raises(CCDDError, match="ipc"):
    distill.init_synthetic(
      images,
      labels,
      3,
      1,
      rng,
      patterns=patterns,
      pattern_labels=np.array([1, 1]),
      triggers_per_pattern=1,
    )
