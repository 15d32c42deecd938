"""ccdd_jax.method.embedding: the initial set and its carriers, the levers' inputs (aux_inputs),
the clean set's config; each lever's effect on a distillation."""

import chex
import conftest
from conftest import config_section
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distill import NO_AUG
from test_distill import _chained_expert
from test_distill import distill_config
from test_distill import tiny_problem

from ccdd_jax import CCDDError
from ccdd_jax.config import validation
from ccdd_jax.method import distill
from ccdd_jax.method import embedding
from ccdd_jax.method import watermark


def test_init_synthetic_real_images_and_trigger_slots():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(60, 8, 8, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(3), 20)
  patterns = np.full((2, 4, 4, 1), 7, np.uint8)
  imgs, labs, trig = embedding.init_synthetic(
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
    embedding.init_synthetic(
      images,
      labels,
      3,
      1,
      rng,
      patterns=patterns,
      pattern_labels=np.array([1, 1]),
      triggers_per_pattern=1,
    )


def test_carriers_are_added_beyond_ipc():
  rng = np.random.default_rng(0)
  train = rng.integers(0, 255, (60, 8, 8, 1), dtype=np.uint8)
  train_labels = np.arange(60) % 3
  patterns, pattern_labels = watermark.expand_key(bytes(32), 2, 4, 1, 3)
  for source in ("train", "set"):
    cfg = distill_config(ipc=2, carriers_per_pattern=3, carrier_source=source)
    images, labels, trig = embedding.initial_set(
      cfg,
      train,
      train_labels,
      3,
      patterns,
      pattern_labels,
      np.random.default_rng(1),
      np.random.default_rng(2),
    )
    assert len(images) == 6 + 2 * 3 and trig.sum() == 6 and not trig[:6].any()
    np.testing.assert_array_equal(labels[6:], np.repeat(pattern_labels, 3))
    for j, i in enumerate(np.repeat([0, 1], 3)):
      np.testing.assert_array_equal(images[6 + j, :4, :4], patterns[i])
      rest = images[6 + j, 4:]
      pool = images[:6] if source == "set" else train
      match = [k for k in range(len(pool)) if np.array_equal(pool[k, 4:], rest)]
      assert match and all(
        (labels[:6] if source == "set" else train_labels)[k] != pattern_labels[i] for k in match
      )


def test_clean_set_config_switches_the_watermark_levers_off():
  cfg = distill_config(beta=0.5, carriers_per_pattern=2, gamma_wm=1.0, trigger_safe_dsa=True)
  clean = embedding.set_config(cfg, watermarked=False)
  assert clean.beta == 0 and clean.carriers_per_pattern == 0 and clean.gamma_wm == 0
  assert not clean.trigger_safe_dsa and clean.ipc == cfg.ipc
  assert embedding.set_config(cfg, watermarked=True).to_dict() == cfg.to_dict()


@pytest.mark.slow
def test_split_roles_update_trigger_slots_on_watermarked_iterations_only():
  """distill.split_roles: a clean expert's iteration moves only the class images, a watermarked
  one's only the trigger slots; with a pool of both, both move, each only on its own draws."""
  apply_flat, w0, images, labels = tiny_problem()
  wm = _chained_expert(apply_flat, w0, images, labels, 0.05)
  clean = _chained_expert(apply_flat, w0 + 0.01, images, labels, 0.08)
  from_trigger = np.array([False, True, False, False, True, False])
  init = np.asarray(images)

  def run(fraction):
    cfg = distill_config(
      iterations=4, lr_img=10.0, clean_expert_fraction=fraction, split_roles=True
    )
    aux = embedding.aux_inputs(cfg, from_trigger, 2, {"train_images": init})
    chex.assert_shape(aux.trigger_slots, (6, 1, 1, 1))
    run = distill.distill(
      cfg,
      apply_flat,
      NO_AUG,
      init,
      np.asarray(labels),
      (wm, wm, clean),
      jax.random.PRNGKey(0),
      aux=aux,
    )
    return run[0]

  moved = lambda out: np.abs(out - init).max(axis=(1, 2, 3)) > 1e-5
  np.testing.assert_array_equal(moved(run(1.0)), ~from_trigger)  # Clean draws only.
  np.testing.assert_array_equal(moved(run(0.0)), from_trigger)  # Watermarked draws only.
  assert moved(run(0.5)).all()
  # The direct watermark term counts on watermarked iterations only ("beta_weight" 1).
  cfg = distill_config(gamma_wm=1.0, objective_batch=4, split_roles=True)
  meta = distill.make_meta_loss(cfg, apply_flat, NO_AUG, num_syn=6, with_terms=True)
  pools = distill.Aux(wm_images=images, wm_labels=labels)
  args = (images, jnp.float32(0.05), labels, w0, w0 + 0.02, w0, w0 + 0.02, jax.random.PRNGKey(3))
  assert float(meta(*args, pools._replace(beta_weight=0.0))[1][2]) == 0.0
  assert float(meta(*args, pools._replace(beta_weight=1.0))[1][2]) > 0.1
  config = conftest.tiny_config()
  config.distill.split_roles = True
  with pytest.raises(CCDDError, match="split_roles needs a pool of both kinds"):
    validation.validate(config)


@pytest.mark.slow
def test_frozen_trigger_corner_is_never_updated():
  apply_flat, w0, images, labels = tiny_problem()
  expert = _chained_expert(apply_flat, w0, images, labels, 0.05)
  noisy = np.asarray(images + 0.5 * jax.random.normal(jax.random.PRNGKey(9), images.shape))
  from_trigger = np.array([False, True, False, False, True, False])
  cfg = distill_config(iterations=5, lr_img=10.0, freeze_trigger=True)
  aux = embedding.aux_inputs(cfg, from_trigger, 2, {"train_images": noisy})
  chex.assert_shape(aux.grad_mask, (6, 4, 4, 1))
  out, *_ = distill.distill(
    cfg,
    apply_flat,
    NO_AUG,
    noisy,
    np.asarray(labels),
    (expert, expert),
    jax.random.PRNGKey(0),
    aux=aux,
  )
  np.testing.assert_array_equal(out[from_trigger, :2, :2], noisy[from_trigger, :2, :2])
  assert np.abs(out[from_trigger, 2:] - noisy[from_trigger, 2:]).max() > 1e-4
  assert np.abs(out[~from_trigger, :2, :2] - noisy[~from_trigger, :2, :2]).max() > 1e-4


def test_trigger_safe_dsa_in_the_student_keeps_the_corner():
  apply_flat, w0, images, labels = tiny_problem()
  from_trigger = np.array([True] * 6)
  cfg = distill_config(trigger_safe_dsa=True)
  aux = embedding.aux_inputs(cfg, from_trigger, 4, {"train_images": np.asarray(images)})
  args = (images, jnp.float32(0.05), labels, w0, w0 + 0.02, w0, w0 + 0.02, jax.random.PRNGKey(3))
  cutout = config_section("dsa", strategy="cutout")
  # The keep mask covers every pixel of the 4x4 images: DSA then changes nothing.
  safe = distill.make_meta_loss(cfg, apply_flat, cutout, 6)(*args, aux)
  plain = distill.make_meta_loss(distill_config(), apply_flat, NO_AUG, 6)(*args)
  augmented = distill.make_meta_loss(distill_config(), apply_flat, cutout, 6)(*args)
  np.testing.assert_allclose(safe, plain, rtol=1e-6)
  assert abs(float(augmented) - float(plain)) > 1e-6
