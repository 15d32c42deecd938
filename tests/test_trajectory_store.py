"""The file trajectory store: the memory store's values, read one vector at a time."""

import json

import chex
import jax
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.config import schema
from ccdd_jax.method import distill
from ccdd_jax.method import models
from ccdd_jax.run import checkpoints
from ccdd_jax.run import trajectory_store

NO_AUG = schema.section("dsa", strategy="none")


def _like():
  return {
    "b": {"kernel": np.zeros((3, 2), np.float32), "bias": np.zeros(2, np.float32)},
    "a": {"scale": np.zeros((1, 5), np.float32)},
  }


def _save(root, kind, start, count, epochs, seed):
  rng = np.random.default_rng(seed)
  stacked = jax.tree.map(
    lambda x: rng.standard_normal((count, epochs + 1, *x.shape)).astype(np.float32), _like()
  )
  checkpoints.save_stacked(root, kind, stacked, start, overwrite=True)


def test_file_store_equals_the_memory_store_bit_for_bit(tmp_path):
  _save(tmp_path, "clean", 0, 3, 4, seed=0)
  memory = checkpoints.load_flat_trajectories(tmp_path, "clean", _like(), 4)
  store = trajectory_store.open_flat(tmp_path, "clean", _like(), 4)
  assert store.shape == memory.shape == (3, 4, 13)
  stacked = checkpoints.load_trajectories(tmp_path, "clean", _like(), epochs=range(4))
  raveled = jax.vmap(jax.vmap(lambda p: ravel_pytree(p)[0]))(stacked)  # What the model unravels.
  np.testing.assert_array_equal(np.asarray(raveled).view(np.uint32), memory.view(np.uint32))
  on_disk = np.load(tmp_path / "flat" / "clean.npy")  # A plain .npy file.
  np.testing.assert_array_equal(on_disk.view(np.uint32), memory.view(np.uint32))
  for e, t in [(0, 0), (2, 3), (1, -1), (-1, 2)]:
    np.testing.assert_array_equal(store[e, t].view(np.uint32), memory[e, t].view(np.uint32))
  with pytest.raises(IndexError):
    store[3, 0]  # pylint: disable=pointless-statement
  with pytest.raises(TypeError, match="one"):
    np.asarray(store)
  loaded = trajectory_store.load(tmp_path, ("clean", "clean"), _like(), 4, "file")
  assert list(loaded) == ["clean"] and loaded["clean"].shape == (3, 4, 13)


def test_file_store_is_rebuilt_when_the_experts_change(tmp_path):
  _save(tmp_path, "watermarked", 0, 2, 3, seed=1)
  first = trajectory_store.open_flat(tmp_path, "watermarked", _like(), 3)
  built = (tmp_path / "flat" / "watermarked.npy").stat().st_mtime_ns
  again = trajectory_store.open_flat(tmp_path, "watermarked", _like(), 3)  # Current: kept.
  assert (tmp_path / "flat" / "watermarked.npy").stat().st_mtime_ns == built
  np.testing.assert_array_equal(again[1, 2], first[1, 2])
  _save(tmp_path, "watermarked", 1, 2, 3, seed=2)  # Expert 1 retrained, expert 2 added.
  rebuilt = trajectory_store.open_flat(tmp_path, "watermarked", _like(), 3)
  memory = checkpoints.load_flat_trajectories(tmp_path, "watermarked", _like(), 3)
  assert rebuilt.shape == (3, 3, 13)
  np.testing.assert_array_equal(rebuilt[1, 2], memory[1, 2])
  assert not np.array_equal(rebuilt[1, 2], first[1, 2])
  tag = json.loads((tmp_path / "flat" / "watermarked.json").read_text())
  assert tag["experts"] == [0, 1, 2] and tag["epochs"] == 3 and tag["params"] == 13
  with open(tmp_path / "flat" / "watermarked.npy", "r+b") as f:  # Cut short by a full disk.
    f.truncate(200)
  with pytest.raises(CCDDError, match="truncated"):
    trajectory_store.FileTrajectories(tmp_path / "flat" / "watermarked.npy")


def test_auto_picks_a_file_past_half_of_the_host_memory():
  assert trajectory_store.resolve("auto", 50, host_bytes=100) == "memory"
  assert trajectory_store.resolve("auto", 51, host_bytes=100) == "file"
  assert trajectory_store.resolve("memory", 10**15, host_bytes=100) == "memory"
  assert trajectory_store.resolve("file", 1, host_bytes=100) == "file"
  assert trajectory_store.host_memory_bytes() > 2**27
  assert trajectory_store.num_params(_like()) == 13


@pytest.mark.slow
def test_a_distillation_over_the_file_store_equals_the_memory_store(tmp_path):
  net = models.ConvNet(num_classes=3, width=4, depth=1, conv_impl="lax")
  params = models.init_params(net, (4, 4, 1), jax.random.PRNGKey(0))
  flat, unravel = ravel_pytree(params)
  apply_flat = lambda w, x: net.apply({"params": unravel(w)}, x)
  like = jax.tree.map(np.asarray, params)
  for kind, seed in (("watermarked", 1), ("fp_enhanced", 2), ("clean", 3)):
    noise = np.random.default_rng(seed).standard_normal((2, 3, flat.size)).astype(np.float32)
    stacked = jax.vmap(jax.vmap(unravel))(np.asarray(flat) + 0.05 * noise)
    checkpoints.save_stacked(tmp_path, kind, stacked)
  kinds = ("watermarked", "fp_enhanced", "clean")
  cfg = schema.section(
    "distill", syn_steps=2, expert_epochs=1, max_start_epoch=1, iterations=3, beta=0.5
  )
  cfg.clean_expert_fraction, cfg.lr_img = 0.5, 1.0
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (6, 4, 4, 1)))
  labels = np.arange(6) % 3
  runs = []
  for store in ("memory", "file"):
    loaded = trajectory_store.load(tmp_path, kinds, like, 3, store)
    trajectories = tuple(loaded[k] for k in kinds)
    args = (cfg, apply_flat, NO_AUG, images, labels, trajectories, jax.random.PRNGKey(2))
    runs.append(distill.distill(*args)[:3])
  assert isinstance(loaded["clean"], trajectory_store.FileTrajectories)
  chex.assert_trees_all_equal(runs[0], runs[1])
