"""Trajectory matching: the scan, the loss, and its gradient."""

import chex
from conftest import config_section
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.method import distill
from ccdd_jax.method import distill as distill_lib
from ccdd_jax.method import embedding
from ccdd_jax.method import evaluate
from ccdd_jax.method import inner_loop
from ccdd_jax.method import models

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_distill_reduces_matching_loss_and_checks_epochs():
  apply_flat, w0, images, labels = tiny_problem()
  loss_fn = lambda w, _: inner_loop.cross_entropy(apply_flat(w, images), labels)
  # An "expert" trained on the images themselves; start from a perturbed set.
  w1, _, _ = inner_loop.sgd_scan(loss_fn, w0, jnp.zeros(8), jnp.full(8, 0.05))
  expert = np.stack([np.stack([w0, w1])])
  cfg = distill_config(iterations=30, lr_img=10.0, expert_epochs=1)
  noisy = images + 0.5 * jax.random.normal(jax.random.PRNGKey(9), images.shape)
  out, lr, losses, _ = distill.distill(
    cfg,
    apply_flat,
    NO_AUG,
    np.asarray(noisy),
    np.asarray(labels),
    (expert, expert),
    jax.random.PRNGKey(0),
  )
  chex.assert_shape(losses, (30, 4))  # Total, expert, twin and direct terms.
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


@pytest.mark.slow
def test_eq10_forms_equal_the_literal_form_at_beta_zero():
  apply_flat, w0, images, labels = tiny_problem()
  args = (images, jnp.float32(0.05), labels, w0, w0 + 0.02, w0 - 0.01, w0 - 0.03)
  dsa = config_section("dsa")  # Full DSA: the forms must share minibatches and augmentation.
  values = [
    distill.make_meta_loss(distill_config(eq10_form=f), apply_flat, dsa, 6, with_terms=True)(
      *args, jax.random.PRNGKey(3)
    )
    for f in distill_lib.EQ10_FORMS
  ]
  assert float(values[0][0]) > 0
  for other in values[1:]:
    np.testing.assert_array_equal(other[0], values[0][0])
    np.testing.assert_array_equal(other[1][1], 0.0)  # No twin term at beta = 0.


def test_eq10_forms_at_positive_beta():
  apply_flat, w0, images, labels = tiny_problem()
  rng, lr = jax.random.PRNGKey(3), jnp.float32(0.05)
  start, target, twin_start, twin_target = w0, w0 + 0.02, w0 - 0.01, w0 - 0.03
  args = (images, lr, labels, start, target, twin_start, twin_target, rng)
  meta = lambda form: distill.make_meta_loss(
    distill_config(beta=0.5, eq10_form=form), apply_flat, NO_AUG, 6, with_terms=True
  )(*args)
  base = distill.make_meta_loss(distill_config(), apply_flat, NO_AUG, 6)
  # (b): the twin term is a second student from twin_start on the same minibatches,
  # i.e. the beta = 0 loss with (twin_start, twin_target) as the expert.
  loss_b, (expert_b, twin_b, _) = meta("second_student")
  alone = base(images, lr, labels, twin_start, twin_target, twin_start, twin_target, rng)
  np.testing.assert_allclose(twin_b, alone, rtol=1e-5)
  np.testing.assert_allclose(loss_b, expert_b + 0.5 * twin_b, rtol=1e-6)
  # (c) and (a) share the numerator and differ in the normaliser only.
  _, (_, twin_a, _) = meta("literal")
  _, (_, twin_c, _) = meta("student_normalised")
  ratio = jnp.sum((twin_start - twin_target) ** 2) / jnp.sum((start - twin_target) ** 2)
  np.testing.assert_allclose(twin_c, twin_a * ratio, rtol=1e-5)
  assert abs(float(twin_c) - float(twin_a)) > 1e-3 * float(twin_a)
  with pytest.raises(ValueError, match="eq10_form"):
    distill.make_meta_loss(distill_config(eq10_form="nope"), apply_flat, NO_AUG, 6)


def _direct_pools(dtype):
  key = jax.random.PRNGKey(8)
  return distill.Aux(
    wm_images=jax.random.normal(key, (7, 4, 4, 1), dtype),
    wm_labels=jnp.array([0, 1, 2, 0, 1, 2, 0]),
    clean_images=jax.random.normal(jax.random.fold_in(key, 1), (9, 4, 4, 1), dtype),
    clean_labels=jnp.arange(9) % 3,
  )


@pytest.mark.slow
def test_direct_objective_adds_the_student_cross_entropies():
  apply_flat, w0, images, labels = tiny_problem()
  aux, rng, lr = _direct_pools(jnp.float32), jax.random.PRNGKey(3), jnp.float32(0.1)
  args = (images, lr, labels, w0, w0 + 0.02, w0, w0 + 0.02, rng)
  plain = distill.make_meta_loss(distill_config(), apply_flat, NO_AUG, 6, with_terms=True)
  cfg = distill_config(gamma_wm=0.7, gamma_clean=0.3, objective_batch=64)
  meta = distill.make_meta_loss(cfg, apply_flat, NO_AUG, 6, with_terms=True)
  loss0, (expert0, _, direct0) = plain(*args, aux)
  loss, (expert, _, direct) = meta(*args, aux)
  np.testing.assert_array_equal(direct0, 0.0)
  np.testing.assert_allclose(expert, expert0, rtol=1e-6)  # The same student.
  np.testing.assert_allclose(loss, loss0 + direct, rtol=1e-6)
  # With a batch of 64 drawn from 7 / 9 images, both CEs are near their pool means.
  assert 0.5 < float(direct) < 5.0


@pytest.mark.slow
def test_direct_objective_gradient_matches_finite_differences():
  with enable_x64():
    apply_flat, w0, images, labels = tiny_problem(jnp.float64)
    cfg = distill_config(syn_steps=3, gamma_wm=0.7, gamma_clean=0.3, objective_batch=5)
    meta = distill.make_meta_loss(cfg, apply_flat, NO_AUG, num_syn=6, with_terms=True)
    aux = _direct_pools(jnp.float64)
    target = w0 + 0.05 * jax.random.normal(jax.random.PRNGKey(5), w0.shape, jnp.float64)
    rng, lr = jax.random.PRNGKey(3), jnp.float64(0.1)
    f = lambda imgs: meta(imgs, lr, labels, w0, target, w0, target, rng, aux)[0]
    direct = meta(images, lr, labels, w0, target, w0, target, rng, aux)[1][2]
    assert float(direct) > 0
    grad = jax.grad(f)(images)
    # The direct term alone moves the gradient (not only the matching term).
    plain = distill.make_meta_loss(distill_config(syn_steps=3), apply_flat, NO_AUG, num_syn=6)
    g_plain = jax.grad(lambda i: plain(i, lr, labels, w0, target, w0, target, rng))
    assert float(jnp.abs(grad - g_plain(images)).max()) > 1e-6
    eps = 1e-5
    for idx in [(0, 0, 0, 0), (3, 2, 1, 0), (5, 3, 3, 0)]:
      bump = jnp.zeros_like(images).at[idx].set(eps)
      fd = (f(images + bump) - f(images - bump)) / (2 * eps)
      np.testing.assert_allclose(grad[idx], fd, rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_soft_labels_one_hot_targets_equal_hard_labels_and_their_gradient_is_exact():
  """Soft targets that are one-hot give the hard-label loss; the meta-loss gradient with respect
  to the learned label logits (through the softmax and the N student steps) matches finite
  differences."""
  logits = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  for smoothing in (0.0, 0.1):
    np.testing.assert_allclose(
      inner_loop.cross_entropy(logits, jax.nn.one_hot(labels, 3), smoothing),
      inner_loop.cross_entropy(logits, labels, smoothing),
      rtol=1e-6,
    )
  with enable_x64():
    apply_flat, w0, images, labels = tiny_problem(jnp.float64)
    meta = distill.make_meta_loss(distill_config(syn_steps=3), apply_flat, NO_AUG, num_syn=6)
    target = w0 + 0.05 * jax.random.normal(jax.random.PRNGKey(5), w0.shape, jnp.float64)
    rng, lr = jax.random.PRNGKey(3), jnp.float64(0.1)
    f = lambda lg: meta(images, lr, jax.nn.softmax(lg), w0, target, w0, target, rng)
    start = 5.0 * jax.nn.one_hot(labels, 3, dtype=jnp.float64)
    grad = jax.grad(f)(start)
    assert float(jnp.abs(grad).max()) > 1e-6
    eps = 1e-5
    for idx in [(0, 0), (2, 1), (5, 2), (4, 0)]:
      bump = jnp.zeros_like(start).at[idx].set(eps)
      fd = (f(start + bump) - f(start - bump)) / (2 * eps)
      np.testing.assert_allclose(grad[idx], fd, rtol=1e-4, atol=1e-10)


@pytest.mark.slow
def test_soft_labels_are_learned_and_frozen_on_trigger_slots():
  apply_flat, w0, images, labels = tiny_problem()
  expert = _chained_expert(apply_flat, w0, images, labels, 0.05)
  from_trigger = np.array([False, True, False, False, True, False])
  init = np.asarray(images)
  cfg = distill_config(iterations=3, soft_labels="one_hot", lr_label=50.0, freeze_trigger=True)
  logits = embedding.initial_label_logits(cfg, np.asarray(labels), 3, lambda: None)
  np.testing.assert_array_equal(logits.argmax(1), labels)
  np.testing.assert_allclose(logits.max(1), cfg.label_logit_scale)
  aux = embedding.aux_inputs(cfg, from_trigger, 2, {"train_images": init})
  run = lambda **kw: distill.distill(
    cfg,
    apply_flat,
    NO_AUG,
    init,
    np.asarray(labels),
    (expert, expert),
    jax.random.PRNGKey(0),
    aux=aux,
    **kw,
  )
  out = run(label_logits=logits)
  chex.assert_shape(out[3], (6, 3))
  np.testing.assert_array_equal(out[3][from_trigger], logits[from_trigger])
  assert np.abs(out[3][~from_trigger] - logits[~from_trigger]).max() > 1e-4
  summary = embedding.soft_label_summary(out[3], np.asarray(labels))
  assert 0.3 < summary["mean_top_probability"] < 1.0
  with pytest.raises(ValueError, match="label_logits go with distill.soft_labels"):
    run()
  expert_init = embedding.initial_label_logits(
    distill_config(soft_labels="expert"), labels, 3, lambda: apply_flat(expert[0, -1], init)
  )
  np.testing.assert_allclose(expert_init, apply_flat(expert[0, -1], init))


@pytest.mark.slow
def test_evaluation_trains_on_the_softmax_of_learned_label_logits():
  net = models.ConvNet(num_classes=3, width=4, depth=1, conv_impl="lax")
  apply = lambda p, x: net.apply({"params": p}, x)
  init = jax.vmap(lambda r: models.init_params(net, (4, 4, 1), r))(
    jax.random.split(jax.random.PRNGKey(0), 2)
  )
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (6, 4, 4, 1)))
  labels = np.array([0, 0, 1, 1, 2, 2])
  ecfg = config_section("eval", epochs=3, batch_size=3, momentum=0.9, weight_decay=5e-4)
  one_hot = 100.0 * np.eye(3, dtype=np.float32)[labels]  # Its softmax is one-hot in float32.
  soft = np.where(np.eye(3, dtype=bool)[labels], 1.0, 0.5).astype(np.float32)
  sets = {
    "hard": {"images": images, "labels": labels, "lr": 0.05},
    "one_hot": {"images": images, "labels": labels, "lr": 0.05, "label_logits": one_hot},
    "soft": {"images": images, "labels": labels, "lr": 0.05, "label_logits": soft},
  }
  trained = {
    name: params
    for name, params, _ in evaluate.train_on_sets(
      apply, NO_AUG, ecfg, init, sets, jax.random.PRNGKey(2)
    )
  }
  chex.assert_trees_all_close(trained["one_hot"], trained["hard"], rtol=1e-5, atol=1e-6)
  leaves = zip(*(jax.tree_util.tree_leaves(trained[n]) for n in ("soft", "hard")), strict=True)
  assert max(float(np.abs(a - b).max()) for a, b in leaves) > 1e-4


def _chained_expert(apply_flat, w0, images, labels, lr):
  loss_fn = lambda w, _: inner_loop.cross_entropy(apply_flat(w, images), labels)
  w1, _, _ = inner_loop.sgd_scan(loss_fn, w0, jnp.zeros(8), jnp.full(8, lr))
  return np.stack([np.stack([w0, w1])])


@pytest.mark.slow
def test_clean_expert_pool_matches_the_clean_expert_when_always_drawn():
  apply_flat, w0, images, labels = tiny_problem()
  wm = _chained_expert(apply_flat, w0, images, labels, 0.05)
  clean = _chained_expert(apply_flat, w0 + 0.01, images, labels, 0.08)
  run = lambda cfg, trajs: distill.distill(
    cfg, apply_flat, NO_AUG, np.asarray(images), np.asarray(labels), trajs, jax.random.PRNGKey(0)
  )
  always = run(distill_config(clean_expert_fraction=1.0), (wm, wm, clean))
  on_clean = run(distill_config(), (clean, clean))
  never = run(distill_config(clean_expert_fraction=0.0), (wm, wm, clean))
  on_wm = run(distill_config(), (wm, wm))
  np.testing.assert_allclose(always[2], on_clean[2], rtol=1e-5)
  np.testing.assert_allclose(always[0], on_clean[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(never[0], on_wm[0])
  assert np.abs(always[2][:, 1] - on_wm[2][:, 1]).max() > 1e-3
