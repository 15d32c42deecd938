"""Tests for ccdd_jax.checkpoints."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.run import checkpoints


def _tree(rng, lead=()):
  """A small flax-like params tree with several leaves and an odd shape."""

  def arr(*shape):
    return rng.standard_normal(lead + shape).astype(np.float32)

  return {
    "params": {
      "Conv_0": {"kernel": arr(3, 3, 3, 5), "bias": arr(5)},
      "Odd_1": {"kernel": arr(7, 1, 13), "scale": arr(1)},
      "Dense_0": {"kernel": arr(11, 3), "bias": arr(3)},
    }
  }


def _assert_tree_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert isinstance(a, np.ndarray)
    assert a.dtype == np.asarray(e).dtype
    np.testing.assert_array_equal(a, np.asarray(e))


def test_save_restore_bit_for_bit(tmp_path):
  rng = np.random.default_rng(0)
  traj = [_tree(rng) for _ in range(4)]
  # Include values whose bits must survive exactly.
  traj[2]["params"]["Odd_1"]["scale"] = np.array([np.nextafter(np.float32(1), 2)], np.float32)
  traj[3]["params"]["Dense_0"]["bias"] = np.array([-0.0, np.inf, 1e-45], np.float32)
  traj = [jax.tree.map(jnp.asarray, t) if i % 2 else t for i, t in enumerate(traj)]
  checkpoints.save_trajectory(tmp_path, "clean", 3, traj)
  like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), traj[0])
  for epoch, expected in enumerate(traj):
    _assert_tree_equal(checkpoints.restore_params(tmp_path, "clean", 3, epoch, like), expected)
  # `like` may also be a tree of concrete arrays.
  _assert_tree_equal(checkpoints.restore_params(tmp_path, "clean", 3, 1, traj[0]), traj[1])


def _file_bytes_read():
  """Bytes TensorStore has read from local files so far (a process-wide counter)."""
  ts = pytest.importorskip("tensorstore")
  if not hasattr(ts, "experimental_collect_matching_metrics"):
    pytest.skip("tensorstore has no metrics API")
  metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
  return sum(v["value"] for m in metrics for v in m["values"])


def test_single_epoch_restore_reads_only_that_epoch(tmp_path):
  rng = np.random.default_rng(1)
  traj = []
  for _ in range(12):
    params = _tree(rng)["params"]
    params["Big"] = {"kernel": rng.standard_normal((100, 200)).astype(np.float32)}
    traj.append({"params": params})
  epoch_bytes = sum(x.nbytes for x in jax.tree.leaves(traj[0]))
  checkpoints.save_trajectory(tmp_path, "watermarked", 0, traj)

  before = _file_bytes_read()
  one = checkpoints.restore_params(tmp_path, "watermarked", 0, 7, traj[0])
  read_one = _file_bytes_read() - before
  _assert_tree_equal(one, traj[7])
  before = _file_bytes_read()
  checkpoints.load_trajectories(tmp_path, "watermarked", traj[0])
  read_all = _file_bytes_read() - before
  assert read_all > 10 * epoch_bytes
  assert read_one < 1.5 * epoch_bytes


def test_save_stacked_and_load_trajectories(tmp_path):
  rng = np.random.default_rng(2)
  num_experts, num_epochs = 3, 4
  stacked = _tree(rng, lead=(num_experts, num_epochs + 1))
  metas = [{"test_accuracy": 0.5 + i / 10} for i in range(num_experts)]
  indices = checkpoints.save_stacked(
    tmp_path,
    "fp_enhanced",
    jax.tree.map(jnp.asarray, stacked),
    start_index=2,
    metadata_per_expert=metas,
  )
  assert indices == [2, 3, 4]
  like = jax.tree.map(lambda x: x[0, 0], stacked)

  loaded = checkpoints.load_trajectories(tmp_path, "fp_enhanced", like)
  _assert_tree_equal(loaded, stacked)

  selected = checkpoints.load_trajectories(
    tmp_path, "fp_enhanced", like, epochs=[4, 0, 2], indices=[4, 2]
  )
  expected = jax.tree.map(lambda x: x[np.array([2, 0])][:, np.array([4, 0, 2])], stacked)
  _assert_tree_equal(selected, expected)

  one = checkpoints.restore_params(tmp_path, "fp_enhanced", 3, 2, like)
  _assert_tree_equal(one, jax.tree.map(lambda x: x[1, 2], stacked))
  assert checkpoints.read_meta(tmp_path, "fp_enhanced", 4)["test_accuracy"] == pytest.approx(0.7)


def test_save_trajectory_accepts_epoch_stacked_tree(tmp_path):
  rng = np.random.default_rng(3)
  stacked = _tree(rng, lead=(3,))
  checkpoints.save_trajectory(tmp_path, "clean", 0, stacked)
  assert checkpoints.num_epochs(tmp_path, "clean", 0) == 2
  like = jax.tree.map(lambda x: x[0], stacked)
  _assert_tree_equal(
    checkpoints.restore_params(tmp_path, "clean", 0, 2, like), jax.tree.map(lambda x: x[2], stacked)
  )


def test_list_experts_num_epochs_and_meta(tmp_path):
  rng = np.random.default_rng(4)
  assert checkpoints.list_experts(tmp_path, "clean") == []
  assert checkpoints.list_experts(tmp_path / "missing", "clean") == []
  for index, n in ((5, 2), (0, 1), (12, 3)):
    meta = {"test_accuracy": np.float32(0.25), "seed": index, "notes": {"lr": [0.01, None]}}
    checkpoints.save_trajectory(
      tmp_path, "clean", index, [_tree(rng) for _ in range(n + 1)], metadata=meta
    )
  checkpoints.save_trajectory(tmp_path, "watermarked", 7, [_tree(rng)])
  # A directory without meta.json (an interrupted save) is not a complete expert.
  (tmp_path / "clean" / "0009" / "trajectory").mkdir(parents=True)

  assert checkpoints.list_experts(tmp_path, "clean") == [0, 5, 12]
  assert checkpoints.list_experts(tmp_path, "watermarked") == [7]
  assert checkpoints.list_experts(tmp_path, "fp_enhanced") == []
  assert checkpoints.num_epochs(tmp_path, "clean", 5) == 2
  assert checkpoints.num_epochs(tmp_path, "watermarked", 7) == 0

  meta = checkpoints.read_meta(tmp_path, "clean", 12)
  assert meta.pop("leaves")["['params']['Odd_1']['kernel']"] == "float32[7, 1, 13]"
  assert meta == {
    "kind": "clean",
    "index": 12,
    "num_epochs": 3,
    "format_version": 1,
    "test_accuracy": 0.25,
    "seed": 12,
    "notes": {"lr": [0.01, None]},
  }
  json.loads((tmp_path / "clean" / "0012" / "meta.json").read_text())
  with pytest.raises(CCDDError, match=r"clean/0009 under .* incomplete"):
    checkpoints.num_epochs(tmp_path, "clean", 9)


def test_missing_root_expert_and_epoch_errors(tmp_path):
  rng = np.random.default_rng(5)
  traj = [_tree(rng) for _ in range(3)]
  like = traj[0]
  with pytest.raises(CCDDError, match=r"no trajectories directory .*nowhere: run --stage=experts"):
    checkpoints.restore_params(tmp_path / "nowhere", "clean", 0, 0, like)
  checkpoints.save_trajectory(tmp_path, "watermarked", 1, traj)
  with pytest.raises(
    CCDDError,
    match=r"no trajectory for expert watermarked/0003 under .*"
    r": run --stage=experts first",
  ):
    checkpoints.restore_params(tmp_path, "watermarked", 3, 0, like)
  with pytest.raises(
    CCDDError,
    match=r"no trajectory for expert watermarked/0001 epoch 12 under "
    r".*: the expert has epochs 0\.\.2 only",
  ):
    checkpoints.restore_params(tmp_path, "watermarked", 1, 12, like)
  with pytest.raises(CCDDError, match=r"no trajectory for expert watermarked/0001 epoch 3 under"):
    checkpoints.load_trajectories(tmp_path, "watermarked", like, epochs=[0, 3])
  shutil.rmtree(tmp_path / "watermarked" / "0001" / "trajectory")
  with pytest.raises(
    CCDDError,
    match=r"no trajectory checkpoint for expert watermarked/0001 "
    r"under .*: run --stage=experts first",
  ):
    checkpoints.load_trajectories(tmp_path, "watermarked", like)
  with pytest.raises(CCDDError, match=r"no clean expert trajectories under"):
    checkpoints.load_trajectories(tmp_path, "clean", like)
  with pytest.raises(CCDDError, match=r"no trajectory for expert watermarked/0002 under"):
    checkpoints.read_meta(tmp_path, "watermarked", 2)


def test_bad_arguments(tmp_path):
  rng = np.random.default_rng(6)
  traj = [_tree(rng) for _ in range(2)]
  with pytest.raises(ValueError, match=r"unknown expert kind 'dirty'"):
    checkpoints.save_trajectory(tmp_path, "dirty", 0, traj)
  with pytest.raises(ValueError, match=r"reserved keys \['num_epochs'\]"):
    checkpoints.save_trajectory(tmp_path, "clean", 0, traj, metadata={"num_epochs": 3})
  with pytest.raises(TypeError, match=r"not JSON serialisable"):
    checkpoints.save_trajectory(tmp_path, "clean", 0, traj, metadata={"f": object()})
  checkpoints.save_trajectory(tmp_path, "clean", 1, traj)
  with pytest.raises(ValueError, match=r"already exists"):
    checkpoints.save_trajectory(tmp_path, "clean", 1, traj)
  checkpoints.save_trajectory(tmp_path, "clean", 1, traj[:1], overwrite=True)
  assert checkpoints.num_epochs(tmp_path, "clean", 1) == 0
  with pytest.raises(CCDDError, match=r"epoch 1 under .*: the expert has epochs 0\.\.0 only"):
    checkpoints.restore_params(tmp_path, "clean", 1, 1, traj[0])
  wrong = jax.tree.map(lambda x: np.zeros(x.shape + (2,), x.dtype), traj[0])
  with pytest.raises(
    CCDDError,
    match=r"cannot restore expert clean/0001 with the given parameter"
    r" structure: leaf \['params'\]\['Conv_0'\]\['bias'\] is float32\[5\] on disk "
    r"but float32\[5, 2\]",
  ):
    checkpoints.restore_params(tmp_path, "clean", 1, 0, wrong)
  as_f64 = jax.tree.map(lambda x: x.astype(np.float64), traj[0])
  with pytest.raises(CCDDError, match=r"float32\[5\] on disk but float64\[5\] in `like`"):
    checkpoints.restore_params(tmp_path, "clean", 1, 0, as_f64)
  missing_leaf = {"params": dict(traj[0]["params"], Extra={"w": np.zeros(2, np.float32)})}
  with pytest.raises(CCDDError, match=r"leaf \['params'\]\['Extra'\]\['w'\] is absent on disk"):
    checkpoints.restore_params(tmp_path, "clean", 1, 0, missing_leaf)
