"""Speed and memory options change no numbers; the distillation step and the experts' epoch
program compile once, without transfers (distillation: donating its state)."""

import functools

import chex
from conftest import config_section
from conftest import tiny_config
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.config import validation
from ccdd_jax.method import distill
from ccdd_jax.method import experts
from ccdd_jax.method import inner_loop
from ccdd_jax.method import models
from ccdd_jax.method import trajectory_pairs

FLIP = config_section("dsa", strategy="flip")
NO_AUG = config_section("dsa", strategy="none")


def problem(conv_impl="lax", num=6):
  """A one-block ConvNet on 6x6 images and the inputs of one meta-gradient."""
  net = models.ConvNet(num_classes=3, width=4, depth=1, conv_impl=conv_impl)
  flat, unravel = ravel_pytree(models.init_params(net, (6, 6, 1), jax.random.PRNGKey(0)))
  apply_flat = lambda w, x: net.apply({"params": unravel(w)}, x)
  images = jax.random.normal(jax.random.PRNGKey(1), (num, 6, 6, 1))
  labels = jnp.arange(num) % 3
  target = flat + 0.05 * jax.random.normal(jax.random.PRNGKey(2), flat.shape)
  return apply_flat, flat, images, labels, target


def distill_config(**kw):
  return config_section(
    "distill",
    **{
      **dict(
        syn_steps=5,
        batch_syn=4,
        beta=0.5,
        expert_epochs=1,
        max_start_epoch=1,
        lr_img=1.0,
        lr_lr=1e-5,
        lr_teacher=0.05,
        iterations=3,
        unroll="auto",
        remat="none",
      ),
      **kw,
    },
  )


@functools.cache
def meta_gradient(conv_impl="lax", unroll=1, remat="none", syn_steps=4):
  """(loss, d loss / d images, d loss / d lr) of eq. 10 through `syn_steps` DSA steps."""
  apply_flat, flat, images, labels, target = problem(conv_impl)
  meta = distill.make_meta_loss(
    distill_config(syn_steps=syn_steps), apply_flat, FLIP, 6, unroll=unroll, remat=remat
  )
  f = jax.jit(jax.value_and_grad(meta, argnums=(0, 1)))
  loss, (g_images, g_lr) = f(
    images, jnp.float32(0.05), labels, flat, target, flat, target - 0.02, jax.random.PRNGKey(3)
  )
  return loss, g_images, g_lr


def assert_same(a, b):
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-4 * float(jnp.abs(b[1]).max()))
  np.testing.assert_allclose(a[2], b[2], rtol=1e-4)


@pytest.mark.slow
def test_unroll_and_conv_impl_give_the_same_meta_gradient():
  reference = meta_gradient("lax", unroll=1)
  assert float(jnp.abs(reference[1]).max()) > 0
  for conv_impl, unroll in [("lax", "full"), ("im2col", 1), ("im2col", "full"), ("shift", 1)]:
    assert_same(meta_gradient(conv_impl, unroll), reference)


@pytest.mark.slow
def test_remat_gives_the_same_meta_gradient():
  for remat in ("full", "dots", "nested"):  # "nested": 2 segments of 2 steps.
    assert_same(meta_gradient(remat=remat), meta_gradient(remat="none"))


def test_nested_remat_keeps_momentum_and_losses():
  w0 = jnp.array([1.0, -2.0, 0.5])
  loss = lambda w, x: jnp.sum((w - x) ** 2) + jnp.sum(w**4)
  xs = jax.random.normal(jax.random.PRNGKey(0), (7, 3))
  lrs = jnp.linspace(0.01, 0.05, 7)
  run = lambda remat, unroll: inner_loop.sgd_scan(
    loss, w0, xs, lrs, momentum=0.9, weight_decay=0.01, remat=remat, unroll=unroll
  )
  reference = run("none", 1)
  for remat, unroll in [("nested", 1), ("nested", 3), ("full", 7)]:
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), run(remat, unroll), reference
    )
  grad = lambda remat: jax.grad(lambda w: jnp.sum(run(remat, 1)[0] ** 2))(w0)
  np.testing.assert_allclose(grad("nested"), grad("none"), rtol=1e-5)


def test_unknown_unroll_and_remat_are_one_line_errors():
  assert inner_loop.resolve_unroll("full", 20) == 20
  assert inner_loop.resolve_unroll("4", 20) == 4
  assert inner_loop.resolve_unroll(50, 20) == 20
  with pytest.raises(ValueError, match="unknown unroll '0'"):
    inner_loop.resolve_unroll("0", 20)
  config = tiny_config()
  config.distill.unroll = "0"
  with pytest.raises(CCDDError, match="invalid config: distill.unroll = '0'"):
    validation.validate(config)
  config.distill.unroll, config.distill.remat = "auto", "sometimes"
  with pytest.raises(CCDDError, match="invalid config: distill.remat = 'sometimes'"):
    validation.validate(config)
  with pytest.raises(ValueError, match="unknown remat policy 'sometimes'"):
    inner_loop.sgd_scan(
      lambda w, _: jnp.sum(w), jnp.ones(2), jnp.zeros(2), jnp.ones(2), remat="sometimes"
    )


def temp_bytes(remat, syn_steps):
  """XLA's scratch memory of one compiled meta-gradient, or None where unreported."""
  apply_flat, flat, images, labels, target = problem("lax")
  meta = distill.make_meta_loss(
    distill_config(syn_steps=syn_steps), apply_flat, FLIP, 6, remat=remat
  )
  f = jax.jit(jax.value_and_grad(meta, argnums=(0, 1)))
  stats = (
    f.lower(images, jnp.float32(0.05), labels, flat, target, flat, target, jax.random.PRNGKey(3))
    .compile()
    .memory_analysis()
  )
  return None if stats is None else stats.temp_size_in_bytes


@pytest.mark.slow
def test_auto_remat_nests_where_the_params_outweigh_a_steps_activations():
  def choice(width, num):
    net = models.ConvNet(num_classes=10, width=width, depth=2, conv_impl="shift")
    flat, unravel = ravel_pytree(models.init_params(net, (8, 8, 1), jax.random.PRNGKey(0)))
    images = jnp.zeros((num, 8, 8, 1))
    loss = lambda w, _: inner_loop.cross_entropy(
      net.apply({"params": unravel(w)}, images), jnp.zeros((num,), jnp.int32)
    )
    step = lambda w, x: (w - 0.1 * jax.grad(loss)(w, x), 0.0)
    return inner_loop.resolve_remat("auto", step, flat, jnp.float32(0.0))

  assert choice(width=16, num=100) == "full"  # The digits config: 3,194 params.
  assert choice(width=128, num=2) == "nested"  # 168k params, 2 images.
  assert inner_loop.resolve_remat("dots", None, None, None) == "dots"


@pytest.mark.slow
def test_remat_reduces_the_memory_of_80_steps():
  none = temp_bytes("none", 80)
  if none is None:
    pytest.skip(f"memory_analysis() reports nothing on {jax.default_backend()}")
  full = temp_bytes("full", 80)
  assert full < none / 2
  assert temp_bytes("nested", 80) < full  # ~2 sqrt(N) stored params vectors, not N.


def counting(fn):
  """`fn` and a list that grows by one each time a trace (or an eager call) runs it."""
  calls = []

  def counted(*args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)

  return counted, calls


def assert_donated(states):
  """Every state but the last was donated (its buffers reused); the last is alive."""
  for old in states[:-1]:
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(old)), (
      "donated state buffers were not reused"
    )
  assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(states[-1]))


def test_distill_step_compiles_once_without_transfers_and_donates_its_state():
  apply_flat, flat, images, labels, _ = problem("lax")
  trajectory = jnp.stack([flat, flat + 0.01, flat + 0.03])
  cfg = distill_config(remat="full")
  update = distill.make_distill_update(cfg, apply_flat, FLIP, images.shape[0])
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(update, n=1), donate_argnums=(0,))
  state = distill.init_state(cfg, np.asarray(images), np.asarray(labels))
  trajectories = jax.device_put((trajectory[None], trajectory[None] - 0.01))
  rngs = list(jax.random.split(jax.random.PRNGKey(4), cfg.iterations))
  states, losses = [state], []
  # Raises on a second trace or on an implicit host-device transfer.
  with jax.transfer_guard("disallow"):
    for rng in rngs:
      state, loss = step(state, trajectories, rng)
      states.append(state)
      losses.append(loss)
  assert np.all(np.isfinite(jax.device_get(losses)))
  assert_donated(states)


def test_the_pipelines_distill_step_compiles_once_without_transfers_and_donates_its_state():
  """distill.make_distill_step, the step distill.distill runs: one trace for every iteration.

  Each iteration gets its own (expert, epoch) pair from trajectory_pairs.pair_feeder, as
  in distill.distill; a retrace (a new shape, dtype or weak type in some iteration)
  would run the function passed in again.
  """
  apply_flat, flat, images, labels, _ = problem("lax")
  trajectory = np.asarray(jnp.stack([flat, flat + 0.01, flat + 0.03]))
  trajectories = (np.stack([trajectory, trajectory + 0.02]), np.stack([trajectory - 0.01] * 2))
  cfg = distill_config(remat="full", iterations=4)
  counted, traced = counting(apply_flat)
  step = distill.make_distill_step(cfg, counted, FLIP, images.shape[0])
  state = distill.init_state(cfg, np.asarray(images), np.asarray(labels))
  keys = jax.random.split(jax.random.PRNGKey(4), cfg.iterations)
  pair_at = trajectory_pairs.pair_feeder(cfg, trajectories, keys, None)
  pairs = [pair_at(it) for it in range(cfg.iterations)]
  starts = {np.asarray(p["start"]).tobytes() for p in pairs}
  assert len(starts) > 1  # The iterations match different pairs.
  rngs = list(keys)
  aux = distill.Aux()  # Every lever off, as distill.distill passes it.
  states, losses, traces = [state], [], []
  with jax.transfer_guard("disallow"):  # Raises on an implicit host-device transfer.
    for rng, pair in zip(rngs, pairs):
      state, loss = step(state, pair, rng, aux)
      states.append(state)
      losses.append(loss)
      traces.append(len(traced))
  assert traces[0] > 0 and traces == [traces[0]] * cfg.iterations, traces
  assert np.all(np.isfinite(jax.device_get(losses)))
  assert_donated(states)


class MemoryExpertStore:
  """experts.ExpertStore in memory: every epoch and finished trajectory, by (kind, start)."""

  def __init__(self):
    self.epochs, self.trajectories = {}, {}

  def finished(self, kind, start, size):
    del size
    return (kind, start) in self.trajectories

  def epochs_done(self, kind, start, size):
    del size
    return list(self.epochs.get((kind, start), []))

  def save_epoch(self, kind, start, epoch, params):
    saved = self.epochs.setdefault((kind, start), [])
    assert epoch == len(saved) + 1
    saved.append(params)

  def finish(self, kind, start, trajectory):
    self.trajectories[kind, start] = trajectory

  def final_params(self, kind):
    raise NotImplementedError


def test_resumable_experts_compile_one_epoch_program_for_every_group_and_epoch():
  """experts.train_experts_resumable, the experts stage's path, traces its epoch program once.

  One group for one epoch traces it once by construction; two groups of that size
  for three epochs must trace it no more: a retrace per epoch or per group
  (a new shape, dtype or Python value among the epoch's arguments) would run the
  `apply_fn` passed in again.
  """
  net = models.ConvNet(num_classes=3, width=4, depth=1, conv_impl="lax")
  apply = models.make_apply(net)
  rng = np.random.default_rng(5)  # NumPy inputs: no eager JAX op to compile.
  data = {
    "train_images": rng.normal(size=(12, 6, 6, 1)).astype(np.float32),
    "train_labels": np.arange(12, dtype=np.int32) % 3,
    "wm_images": rng.normal(size=(4, 6, 6, 1)).astype(np.float32),
    "wm_labels": np.array([1, 1, 2, 2], np.int32),
    "prune_images": np.zeros((4, 6, 6, 1), np.float32),
  }
  init_all = jax.jit(jax.vmap(lambda r: models.init_params(net, (6, 6, 1), r)))(
    jax.random.split(jax.random.PRNGKey(0), 4)
  )

  def train(num_experts, epochs):
    init = jax.tree_util.tree_map(lambda x: x[:num_experts], init_all)
    cfg = config_section(
      "experts", epochs=epochs, lr=0.05, batch_size=6, wm_batch_size=2, group_size=2
    )
    counted, traced = counting(apply)
    store = MemoryExpertStore()
    experts.train_experts_resumable(
      "clean",
      cfg,
      counted,
      NO_AUG,
      init,
      init,
      jax.random.PRNGKey(1),
      data,
      store,
      concurrency=2,
    )
    assert sorted(store.trajectories) == [("clean", s) for s in range(0, num_experts, 2)]
    assert [len(saved) for saved in store.epochs.values()] == [epochs] * (num_experts // 2)
    for trajectory in store.trajectories.values():
      chex.assert_tree_shape_prefix(trajectory, (2, epochs + 1))
    return len(traced)

  once = train(num_experts=2, epochs=1)
  assert once > 0
  twice = train(num_experts=4, epochs=3)
  assert twice == once, f"the epoch program traced {twice // once} times, not once"
