"""Runs each stage on 1 device and on N simulated CPU devices; exits 1 unless they agree.

tests/test_sharding.py starts it in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N (N = 4) and JAX_PLATFORMS=cpu,
because the device count is fixed when JAX starts. Prints one JSON line: the
checks passed and how each N-device result was laid out.
"""

import json
import sys
import time

import chex
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from ccdd_jax.config import schema
from ccdd_jax.devices import sharding
from ccdd_jax.method import distill
from ccdd_jax.method import evaluate
from ccdd_jax.method import experts
from ccdd_jax.method import models

TOL = dict(rtol=1e-5, atol=1e-5)
DSA = schema.section("dsa", strategy="flip")  # Random per image: inside the sharded steps.


class MemoryStore:
  """experts.ExpertStore in memory: no epoch is resumed, finished groups are kept."""

  def __init__(self):
    self.groups = {}

  def finished(self, kind, start, size):
    return (kind, start) in self.groups

  def epochs_done(self, kind, start, size):
    return []

  def save_epoch(self, kind, start, epoch, params):
    pass

  def finish(self, kind, start, trajectory):
    self.groups[kind, start] = trajectory

  def stacked(self, kind):
    starts = sorted(s for k, s in self.groups if k == kind)
    return jax.tree_util.tree_map(
      lambda *x: np.concatenate(x), *(self.groups[kind, s] for s in starts)
    )


def network():
  net = models.ConvNet(num_classes=3, width=4, depth=1, conv_impl="lax")
  return net, models.make_apply(net)


def run_experts(mesh):
  """3 fine-pruning-enhanced experts (padded to a multiple of the devices), 2 epochs."""
  net, apply = network()
  init = jax.vmap(lambda r: models.init_params(net, (8, 8, 1), r))(
    jax.random.split(jax.random.PRNGKey(0), 3)
  )
  rng = jax.random.PRNGKey(5)
  data = {
    "train_images": jax.random.normal(rng, (12, 8, 8, 1)),
    "train_labels": jnp.arange(12) % 3,
    "wm_images": jax.random.normal(jax.random.PRNGKey(6), (4, 8, 8, 1)),
    "wm_labels": jnp.array([1, 1, 2, 2]),
    "prune_images": jax.random.normal(jax.random.PRNGKey(7), (4, 8, 8, 1)),
  }
  cfg = schema.section(
    "experts", epochs=2, lr=0.05, batch_size=6, wm_batch_size=2, lambda3=1.0, group_size=0
  )
  store = MemoryStore()
  experts.train_experts_resumable(
    "fp_enhanced", cfg, apply, DSA, init, init, rng, data, store, concurrency=1, mesh=mesh
  )
  return store.stacked("fp_enhanced")


def run_distill(mesh, pairs=1):
  """3 iterations on 8 images, minibatches of 4, beta and a clean pool (both paths drawn);
  with `pairs` per iteration a multiple of the devices, the pairs are split instead."""
  net, apply = network()
  params = models.init_params(net, (8, 8, 1), jax.random.PRNGKey(0))
  flat, unravel = ravel_pytree(params)
  apply_flat = lambda w, x: apply(unravel(w), x)
  noise = lambda seed, shape: np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape))
  expert = flat + 0.01 * noise(1, (2, 3, flat.size))  # [experts, epochs, P]
  twin, clean = expert + 0.02 * noise(2, expert.shape), expert + 0.03 * noise(3, expert.shape)
  cfg = schema.section(
    "distill",
    iterations=3,
    syn_steps=3,
    batch_syn=4,
    beta=0.5,
    expert_epochs=1,
    max_start_epoch=1,
    clean_expert_fraction=0.5,
    lr_img=10.0,
    pairs_per_iteration=pairs,
  )
  images = noise(4, (8, 8, 8, 1)).astype(np.float32)
  labels = np.arange(8) % 3
  out = distill.distill(
    cfg, apply_flat, DSA, images, labels, (expert, twin, clean), jax.random.PRNGKey(3), mesh=mesh
  )
  return {"images": out[0], "lr": np.float32(out[1]), "losses": out[2]}


def run_evaluate(mesh):
  """3 seeds (padded to a multiple of the devices) trained 2 epochs on 12 images."""
  net, apply = network()
  init = jax.vmap(lambda r: models.init_params(net, (8, 8, 1), r))(
    jax.random.split(jax.random.PRNGKey(0), 3)
  )
  images = jax.random.normal(jax.random.PRNGKey(1), (12, 8, 8, 1))
  labels = np.arange(12) % 3
  train = evaluate.make_networks_trainer(
    apply, DSA, epochs=2, batch_size=6, momentum=0.9, weight_decay=5e-4, mesh=mesh
  )
  return jax.device_get(train(init, images, labels, 0.05, jax.random.PRNGKey(2)))


def main(argv):
  n = int(argv[1]) if len(argv) > 1 else 4
  if len(jax.devices()) < n:
    sys.exit(f"{len(jax.devices())} devices: set XLA_FLAGS=--xla_force_host_platform_device_count")
  one, many = sharding.make_mesh(jax.devices()[:1]), sharding.make_mesh(jax.devices()[:n])
  checked = []
  pairs = lambda mesh: run_distill(mesh, pairs=n)  # The pair axis split over the devices.
  for name, fn in (
    ("experts", run_experts),
    ("distill", run_distill),
    ("distill_pairs", pairs),
    ("evaluate", run_evaluate),
  ):
    start = time.time()
    single, spread = fn(one), fn(many)
    chex.assert_trees_all_close(spread, single, **TOL)
    chex.assert_trees_all_equal_shapes(spread, single)
    checked.append(name)
    print(f"{name}: {time.time() - start:.1f} s", file=sys.stderr)
  print(json.dumps({"devices": n, "checked": checked}))


if __name__ == "__main__":
  main(sys.argv)
