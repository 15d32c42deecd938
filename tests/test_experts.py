"""The three expert kinds differ only in their loss (eq. 6, 8) and share their init."""

import os

import chex
from conftest import config_section
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccdd_jax.devices import parallel
from ccdd_jax.method import augment
from ccdd_jax.method import experts
from ccdd_jax.method import inner_loop
from ccdd_jax.method import models
from ccdd_jax.method import pruning
from ccdd_jax.method import watermark
from ccdd_jax.run import checkpoints

NO_AUG = config_section("dsa", strategy="none")


def setup():
  net = models.ConvNet(num_classes=3, width=4, depth=2, conv_impl="lax")
  apply = models.make_apply(net)
  params = models.init_params(net, (8, 8, 1), jax.random.PRNGKey(0))
  anchor = jax.tree_util.tree_map(lambda p: p + 0.1, params)
  rng = jax.random.PRNGKey(1)
  batch = {
    "images": jax.random.normal(rng, (6, 8, 8, 1)),
    "labels": jnp.array([0, 1, 2] * 2),
    "wm_images": jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 1)),
    "wm_labels": jnp.array([1, 1, 2, 2]),
    "anchor": anchor,
    "channel_mask": jnp.array([1.0, 0.0, 1.0, 0.0]),
    "rng": jax.random.PRNGKey(3),
    "family_rng": jax.random.PRNGKey(4),
  }
  cfg = config_section("experts", lambda1=2.0, lambda2=0.5, lambda3=3.0)
  return apply, params, batch, cfg


@pytest.mark.slow
def test_losses_are_eq6_and_eq8():
  apply, params, batch, cfg = setup()
  ce_clean = inner_loop.cross_entropy(apply(params, batch["images"]), batch["labels"])
  ce_wm = inner_loop.cross_entropy(apply(params, batch["wm_images"]), batch["wm_labels"])
  ce_pruned = inner_loop.cross_entropy(
    apply(params, batch["wm_images"], channel_mask=batch["channel_mask"]), batch["wm_labels"]
  )
  anchor = experts.squared_distance(params, batch["anchor"])
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(params))
  np.testing.assert_allclose(anchor, 0.01 * n_params, rtol=1e-4)
  loss = lambda kind: experts.expert_loss_fn(kind, cfg, apply, NO_AUG)(params, batch)
  np.testing.assert_allclose(loss("clean"), ce_clean, rtol=1e-5)
  np.testing.assert_allclose(loss("watermarked"), ce_clean + 2.0 * ce_wm + 0.5 * anchor, rtol=1e-5)
  np.testing.assert_allclose(
    loss("fp_enhanced"), ce_clean + 2.0 * ce_wm + 0.5 * anchor + 3.0 * ce_pruned, rtol=1e-5
  )


def test_prune_mask_removes_least_active_channels():
  mask = pruning.prune_mask(jnp.array([0.5, 0.1, 0.9, 0.0, 0.3]), 0.4)
  np.testing.assert_array_equal(mask, [1, 0, 1, 0, 1])


@pytest.mark.slow
def test_expert_kinds_share_their_initial_parameters(tiny_run):
  workdir, config, _ = tiny_run
  root = workdir / "trajectories"
  net = models.build(config.model.name, 10, config.model)
  like = jax.eval_shape(lambda: models.init_params(net, (8, 8, 1), jax.random.PRNGKey(0)))
  for index in range(config.experts.num_experts):
    first = [checkpoints.restore_params(root, kind, index, 0, like) for kind in experts.KINDS]
    last = [
      checkpoints.restore_params(root, kind, index, config.experts.epochs, like)
      for kind in experts.KINDS
    ]
    for other in first[1:]:
      jax.tree_util.tree_map(np.testing.assert_array_equal, first[0], other)
    # Their losses differ, so their trajectories do.
    diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), last[0], last[1])
    assert max(jax.tree_util.tree_leaves(diff)) > 0
    meta = checkpoints.read_meta(root, "watermarked", index)
    assert 0.0 <= meta["acc_w"] <= 1.0 and 0.0 <= meta["test_acc"] <= 1.0


@pytest.mark.slow
def test_expert_groups_and_concurrency():
  # Concurrency never changes a bit; the group size only the float rounding.
  net = models.ConvNet(num_classes=3, width=4, depth=2, conv_impl="shift")
  apply = models.make_apply(net)
  init = jax.vmap(lambda r: models.init_params(net, (8, 8, 1), r))(
    jax.random.split(jax.random.PRNGKey(0), 3)
  )
  rng = jax.random.PRNGKey(5)
  data = {
    "train_images": jax.random.normal(rng, (12, 8, 8, 1)),
    "train_labels": jnp.arange(12) % 3,
    "wm_images": jax.random.normal(jax.random.PRNGKey(6), (4, 8, 8, 1)),
    "wm_labels": jnp.array([1, 1, 2, 2]),
    "prune_images": jnp.zeros((4, 8, 8, 1)),
  }
  cfg = config_section(
    "experts",
    epochs=2,
    lr=0.05,
    momentum=0.0,
    batch_size=6,
    wm_batch_size=2,
    lambda1=1.0,
    lambda2=0.0,
    lambda3=1.0,
    prune_ratio=0.5,
    group_size=1,
  )
  progress = []
  train = lambda cfg, concurrency, **kw: experts.train_experts(
    "watermarked", cfg, apply, NO_AUG, init, init, rng, data, concurrency=concurrency, **kw
  )
  one_by_one = train(cfg, 1, on_group_done=lambda done, total: progress.append((done, total)))
  assert progress == [(1, 3), (2, 3), (3, 3)]
  chex.assert_trees_all_equal(train(cfg, 2), one_by_one)
  chex.assert_shape(jax.tree_util.tree_leaves(one_by_one)[0][:, :, 0], (3, 3))
  cfg.group_size = 2  # Groups of 2 and 1: vmapped, so equal up to rounding.
  chex.assert_trees_all_close(train(cfg, 2), one_by_one, rtol=1e-5, atol=1e-5)
  assert parallel.resolve_concurrency(3) == 3
  assert parallel.resolve_concurrency(0) == (os.cpu_count() or 1)  # CPU backend here.


@pytest.mark.slow
def test_trigger_safe_dsa_shows_the_network_the_unaugmented_trigger():
  apply, params, batch, cfg = setup()
  cutout = config_section("dsa", strategy="cutout")
  batch["trigger_corner"] = jnp.ones((1, 8, 8, 1))  # The whole image kept: no DSA on D_W.
  rng_clean, _ = jax.random.split(batch["rng"])
  family_clean, _ = jax.random.split(batch["family_rng"])
  images = augment.augment(batch["images"], rng_clean, cutout, family_rng=family_clean)
  ce_clean = inner_loop.cross_entropy(apply(params, images), batch["labels"])
  ce_wm = inner_loop.cross_entropy(apply(params, batch["wm_images"]), batch["wm_labels"])
  anchor = experts.squared_distance(params, batch["anchor"])
  loss = lambda c: experts.expert_loss_fn("watermarked", c, apply, cutout)(params, batch)
  safe = loss(config_section("experts", lambda1=2.0, lambda2=0.5, trigger_safe_dsa=True))
  np.testing.assert_allclose(safe, ce_clean + 2.0 * ce_wm + 0.5 * anchor, rtol=1e-5)
  assert abs(float(loss(cfg)) - float(safe)) > 1e-4  # Today's: D_W is cut out too.


def _fp_problem():
  net = models.ConvNet(num_classes=3, width=4, depth=2, conv_impl="lax")
  apply = models.make_apply(net)
  init = models.init_params(net, (8, 8, 1), jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(1)
  data = {
    "train_images": jax.random.normal(key, (12, 8, 8, 1)),
    "train_labels": jnp.arange(12) % 3,
    "wm_images": jax.random.normal(jax.random.fold_in(key, 1), (4, 8, 8, 1)),
    "wm_labels": jnp.array([1, 1, 2, 2]),
    "prune_images": jax.random.normal(jax.random.fold_in(key, 2), (6, 8, 8, 1)),
    "trigger_corner": jnp.asarray(watermark.corner_mask((8, 8), 4)),
  }
  cfg = lambda k: config_section(
    "experts",
    epochs=3,
    lr=0.05,
    batch_size=4,
    wm_batch_size=2,
    lambda3=2.0,
    fp_normal_last_epochs=k,
  )
  train = lambda kind, k: experts.make_trainer(kind, cfg(k), apply, NO_AUG)(
    init, init, jax.random.PRNGKey(2), jax.random.PRNGKey(3), data
  )
  return train


@pytest.mark.slow
def test_last_k_epochs_normal_equal_the_normal_watermarked_trainer_there():
  train = _fp_problem()
  # All epochs "normal": exactly the eq. 6 (watermarked) trainer.
  chex.assert_trees_all_close(train("fp_enhanced", 3), train("watermarked", 0), rtol=1e-6)
  # k = 1: the first 2 epochs are eq. 8's, the last one eq. 6's.
  last1, never = train("fp_enhanced", 1), train("fp_enhanced", 0)
  chex.assert_trees_all_equal(*(jax.tree_util.tree_map(lambda a: a[:3], t) for t in (last1, never)))
  gap = jax.tree_util.tree_map(lambda a, b: float(jnp.abs(a[3] - b[3]).max()), last1, never)
  assert max(jax.tree_util.tree_leaves(gap)) > 1e-5
  # fp_normal_last_epochs only concerns the fp-enhanced kind.
  chex.assert_trees_all_equal(train("watermarked", 2), train("watermarked", 0))
