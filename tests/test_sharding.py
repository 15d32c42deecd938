"""Several devices give one device's results; the sharding helpers; launcher detection."""

import json
import os
import subprocess
import sys

import conftest
import jax
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.devices import sharding

REPO = conftest.REPO


@pytest.mark.slow
def test_four_simulated_devices_equal_one_for_experts_distillation_and_evaluation():
  # The device count is fixed when JAX starts: a subprocess with 4 CPU devices
  # runs each stage on a mesh of 1 and of 4 and compares (tests/sharding_worker.py).
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=4",
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
  )
  worker = REPO / "tests" / "sharding_worker.py"
  out = subprocess.run(
    [sys.executable, str(worker), "4"], env=env, capture_output=True, text=True, timeout=600
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  checked = ["experts", "distill", "distill_pairs", "evaluate"]
  assert result == {"devices": 4, "checked": checked}


@pytest.mark.parametrize(
  "env, expected",
  [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),  # One task: nothing to initialise.
    ({"SLURM_NTASKS": "2"}, "Slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "Open MPI"),
    ({"TPU_WORKER_HOSTNAMES": "t1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, "TPU pod"),
  ],
)
def test_launcher_detection_from_the_environment(monkeypatch, env, expected):
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert sharding.detected_launcher() == expected


def test_distributed_modes(monkeypatch):
  with pytest.raises(CCDDError, match="--distributed='yes': use auto, on or off"):
    sharding.maybe_initialize_distributed("yes")
  monkeypatch.delenv("SLURM_NTASKS", raising=False)
  monkeypatch.delenv("OMPI_COMM_WORLD_SIZE", raising=False)
  monkeypatch.delenv("TPU_WORKER_HOSTNAMES", raising=False)
  assert sharding.maybe_initialize_distributed("off") is False
  assert sharding.maybe_initialize_distributed("auto") is False  # No launcher: one process.
  monkeypatch.setenv("SLURM_NTASKS", "2")
  assert sharding.maybe_initialize_distributed("off") is False  # Off wins over a launcher.


@pytest.mark.slow
def test_distributed_on_without_a_cluster_fails_in_one_line():
  # A fresh process: jax.distributed.initialize() must come before any JAX work.
  code = (
    "from ccdd_jax.devices import sharding\n"
    "try:\n"
    "  sharding.maybe_initialize_distributed('on')\n"
    "except Exception as e:\n"
    "  print(type(e).__name__, str(e).count(chr(10)))\n"
  )
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
  )
  assert out.stdout.strip() == "CCDDError 0", out.stdout + out.stderr[-2000:]


@pytest.mark.slow
def test_main_refuses_a_bad_distributed_value_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out = subprocess.run(
    [sys.executable, "-m", "ccdd_jax.main", f"--workdir={tmp_path}", "--distributed=maybe"],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert out.returncode == 1
  assert out.stderr.strip() == "error: --distributed='maybe': use auto, on or off"
  assert not any(tmp_path.iterdir())  # Nothing written.


@pytest.mark.slow
def test_main_refuses_more_devices_than_there_are_in_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(
    [sys.executable, "-m", "ccdd_jax.main", f"--workdir={tmp_path}", "--num_devices=99"],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 1
  assert (
    out.stderr.strip() == "error: num_devices = 99: this run has 1 cpu device(s) (0 = all of them)"
  )
  assert not (tmp_path / "owner.key").exists()


def test_mesh_and_one_device_helpers_change_nothing():
  mesh = sharding.resolve_mesh(0)
  assert mesh.size == len(jax.devices()) and mesh.axis_names == (sharding.AXIS,)
  assert sharding.resolve_mesh(1).size == 1
  with pytest.raises(CCDDError, match=r"num_devices = 99: this run has \d+ cpu device"):
    sharding.resolve_mesh(99)
  one = sharding.make_mesh(jax.devices()[:1])
  tree = {"a": np.arange(6.0).reshape(3, 2)}
  assert sharding.pad_leading(tree, one) is tree
  assert sharding.put_leading(tree, one) is tree and sharding.put_replicated(tree, None) is tree
  assert sharding.padded_size(3, one) == 3 and sharding.size(None) == 1
  sharding.check_batch(5, one, "batch")
  assert sharding.is_writer() and not sharding.multi_process()
  sharding.barrier("nothing to wait for")


def test_padding_to_a_multiple_of_the_devices():
  class FakeMesh:
    size = 4

  tree = {"a": np.arange(6.0).reshape(3, 2)}
  padded = sharding.pad_leading(tree, FakeMesh())
  np.testing.assert_array_equal(padded["a"], [[0, 1], [2, 3], [4, 5], [4, 5]])
  np.testing.assert_array_equal(sharding.unpad(padded, 3)["a"], tree["a"])
  assert sharding.padded_size(5, FakeMesh()) == 8
  with pytest.raises(CCDDError, match="batch_syn = 6 does not split over 4 devices"):
    sharding.check_batch(6, FakeMesh(), "batch_syn")
