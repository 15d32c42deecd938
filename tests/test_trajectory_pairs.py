"""Several trajectory pairs per iteration: the mean of the single pairs, drawn from split keys."""

import chex
import jax
from jax.flatten_util import ravel_pytree
import numpy as np
import optax
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.config import schema
from ccdd_jax.config import validation
from ccdd_jax.method import distill
from ccdd_jax.method import models
from ccdd_jax.method import trajectory_pairs

NO_AUG = schema.section("dsa", strategy="none")


def _problem():
  net = models.ConvNet(num_classes=3, width=4, depth=1, conv_impl="lax")
  params = models.init_params(net, (4, 4, 1), jax.random.PRNGKey(0))
  flat, unravel = ravel_pytree(params)
  apply_flat = lambda w, x: net.apply({"params": unravel(w)}, x)
  noise = lambda seed, shape: np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape))
  expert = np.asarray(flat) + 0.05 * noise(1, (3, 3, flat.size))  # [E, T, P]
  trajectories = (
    expert,
    expert + 0.02 * noise(2, expert.shape),
    expert[:2] + 0.03 * noise(3, (2, 3, flat.size)),
  )
  images = noise(4, (6, 4, 4, 1)).astype(np.float32)
  return apply_flat, trajectories, images, np.arange(6) % 3


def _config(**kw):
  cfg = schema.section(
    "distill", syn_steps=2, expert_epochs=1, max_start_epoch=1, beta=0.5, lr_img=1.0, iterations=2
  )
  cfg.clean_expert_fraction = 0.5
  cfg.update(kw)
  return cfg


def test_pairs_feeder_draws_each_pair_from_the_split_key():
  rng = np.random.default_rng(0)
  trajectories = tuple(rng.standard_normal((e, 3, 7)).astype(np.float32) for e in (3, 3, 2))
  rngs = jax.random.split(jax.random.PRNGKey(7), 3)
  feed = trajectory_pairs.pair_feeder(_config(pairs_per_iteration=4), trajectories, rngs, None)
  keys = jax.vmap(lambda r: jax.random.split(r, 4))(rngs)  # [iterations, pairs] keys.
  # One pair per iteration from each of those keys: the pairs an iteration of 4 stacks.
  single = trajectory_pairs.pair_feeder(_config(), trajectories, keys.reshape(12, -1), None)
  for it in range(3):
    stacked = feed(it)
    chex.assert_shape(stacked["start"], (4, 7))
    for p in range(4):
      chex.assert_trees_all_equal(
        jax.tree_util.tree_map(lambda x, p=p: x[p], stacked), single(4 * it + p)
      )


def test_mean_over_pairs_vmapped_or_in_turn_is_the_mean_of_each_pair():
  def pair_fn(state, pair, rng, aux):
    noise = jax.random.normal(rng, (2,))
    return state * pair["x"] + noise, {"g": pair["x"] ** 2 + aux}

  pair, rng = {"x": np.arange(3.0, dtype=np.float32)}, jax.random.PRNGKey(1)
  each = [pair_fn(2.0, {"x": x}, k, 1.0) for x, k in zip(pair["x"], jax.random.split(rng, 3))]
  expected = jax.tree_util.tree_map(lambda *v: np.mean(v, axis=0), *each)
  for batched in (True, False):
    mean = jax.jit(trajectory_pairs.mean_over_pairs(pair_fn, 3, batched))
    chex.assert_trees_all_close(mean(2.0, pair, rng, 1.0), expected, rtol=1e-6)
  assert trajectory_pairs.mean_over_pairs(pair_fn, 1) is pair_fn


@pytest.mark.slow
def test_the_pairs_gradient_is_the_mean_of_the_single_pairs_gradients():
  apply_flat, trajectories, images, labels = _problem()
  rng, k = jax.random.PRNGKey(5), 3
  state = distill.init_state(_config(), images, labels)
  many = distill.make_distill_update(_config(pairs_per_iteration=k), apply_flat, NO_AUG, 6)
  one = distill.make_distill_update(_config(), apply_flat, NO_AUG, 6)
  new, history = jax.jit(many)(state, trajectories, rng)
  singles = [jax.jit(one)(state, trajectories, key) for key in jax.random.split(rng, k)]
  # SGD with momentum from a zero trace: a first step moves by -lr x the gradient.
  mean = lambda name: np.mean([s[0][name] for s in singles], axis=0)
  np.testing.assert_allclose(new["images"], mean("images"), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["lr"], mean("lr"), rtol=1e-6)
  np.testing.assert_allclose(history, np.mean([s[1] for s in singles], axis=0), rtol=1e-5)
  assert len({float(s[1][2]) for s in singles}) > 1  # The pairs differ (one from the pool).


def _old_update(cfg, apply_flat, num_syn):
  """The single-pair update as it was written before pairs_per_iteration (the reference)."""
  meta = distill.make_meta_loss(
    cfg, apply_flat, NO_AUG, num_syn, unroll=cfg.unroll, remat=cfg.remat, with_terms=True
  )
  optimizer = distill.make_optimizer(cfg)

  def update(state, pair, rng):
    aux = distill.Aux(beta_weight=pair.get("beta_weight"))
    rng_loss = jax.random.split(rng, 3)[2]
    args = (pair["start"], pair["target"], pair["twin_start"], pair["twin_target"], rng_loss, aux)
    (loss, terms), grads = jax.value_and_grad(meta, argnums=(0, 1), has_aux=True)(
      state["images"], state["lr"], state["labels"], *args
    )
    trainable = {"images": state["images"], "lr": state["lr"]}
    grad_tree = {"images": grads[0], "lr": grads[1]}
    updates, opt_state = optimizer.update(grad_tree, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    trainable["lr"] = jax.numpy.maximum(trainable["lr"], 1e-6)
    return {**trainable, "opt_state": opt_state, "labels": state["labels"]}, jax.numpy.stack(
      [loss, *terms]
    )

  return update


@pytest.mark.slow
def test_one_pair_per_iteration_is_the_old_update_bit_for_bit():
  apply_flat, trajectories, images, labels = _problem()
  cfg = _config(pairs_per_iteration=1)
  feed = trajectory_pairs.pair_feeder(
    cfg, trajectories, jax.random.split(jax.random.PRNGKey(3), 2), None
  )
  new, old = (
    distill.make_distill_step(cfg, apply_flat, NO_AUG, 6),
    jax.jit(_old_update(cfg, apply_flat, 6)),
  )
  state_new = distill.init_state(cfg, images, labels)
  state_old = distill.init_state(cfg, images, labels)
  for it, rng in enumerate(jax.random.split(jax.random.PRNGKey(3), 2)):
    state_new, history_new = new(state_new, feed(it), rng)
    state_old, history_old = old(state_old, feed(it), rng)
    chex.assert_trees_all_equal(history_new, history_old)
  chex.assert_trees_all_equal(state_new, state_old)


@pytest.mark.parametrize(
  "field, value, message",
  [("pairs_per_iteration", 0, "must be >= 1"), ("trajectory_store", "disk", "use one of")],
)
def test_bad_pairs_and_stores_fail_in_one_line(field, value, message):
  config = schema.base_config()
  config.distill[field] = value
  with pytest.raises(CCDDError, match=message) as err:
    validation.validate(config)
  assert "\n" not in str(err.value) and f"distill.{field}" in str(err.value)
