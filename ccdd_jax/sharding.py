"""Devices and hosts: JAX's own multi-device engine (a Mesh, NamedSharding), nothing more.

One mesh axis, "devices", over every device of every process. What is
spread over it:

  experts     the expert axis of a vmapped group (each device trains a slice)
  distill     the synthetic minibatch inside each student step (data
              parallel: parameters replicated, gradients summed by XLA), so
              the algorithm is exactly the one-device algorithm
  evaluate    the seeds axis of the vmapped networks

Multi-host runs call `jax.distributed.initialize()` first: auto-detected on
Slurm, TPU pods and Open MPI (`maybe_initialize_distributed("auto")`), or
forced with `--distributed=on`. Only process 0 writes reports
(`is_writer`). docs/scaling.md has the measured figures.
"""

import os

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from ccdd_jax import CCDDError

AXIS = "devices"

# Environment variables that a multi-process launcher sets, and the count they carry.
_LAUNCHERS = {
  "Slurm": "SLURM_NTASKS",
  "Open MPI": "OMPI_COMM_WORLD_SIZE",
}


def detected_launcher() -> str | None:
  """The multi-process launcher this process runs under, if any (Slurm, Open MPI, TPU pod)."""
  for name, variable in _LAUNCHERS.items():
    if int(os.environ.get(variable, "1") or "1") > 1:
      return name
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h.strip()]) > 1:
    return "TPU pod"
  return None


def maybe_initialize_distributed(mode: str) -> bool:
  """Calls `jax.distributed.initialize()` for mode "on", or for "auto" under a launcher.

  Returns whether this is a multi-process run. Must run before any other JAX call.
  """
  if mode not in ("auto", "on", "off"):
    raise CCDDError(f"--distributed={mode!r}: use auto, on or off")
  if mode == "off" or (mode == "auto" and detected_launcher() is None):
    return False
  try:
    jax.distributed.initialize()
  except Exception as e:  # JAX raises assorted types when the cluster is not reachable.
    lines = str(e).strip().splitlines()
    raise CCDDError(
      f"jax.distributed.initialize() failed ({detected_launcher() or 'forced'}): "
      f"{lines[0] if lines else type(e).__name__}"
    ) from e
  return jax.process_count() > 1


def is_writer() -> bool:
  """Whether this process writes reports and files (process 0 only)."""
  return jax.process_index() == 0


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh ("devices") over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (AXIS,))


def shard_leading(mesh: Mesh) -> NamedSharding:
  """Arrays split along their first axis over the mesh."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Arrays held whole on every device."""
  return NamedSharding(mesh, PartitionSpec())


def divides(mesh: Mesh | None, size: int) -> bool:
  """Whether an axis of `size` can be split evenly over the mesh (always, without one)."""
  return mesh is None or size % mesh.size == 0


def put_leading(tree, mesh: Mesh | None):
  """`tree` on the mesh, leaves split along their first axis (unchanged without a mesh)."""
  if mesh is None or mesh.size == 1:
    return tree
  return jax.device_put(tree, shard_leading(mesh))


def put_replicated(tree, mesh: Mesh | None):
  """`tree` replicated on every device of the mesh (unchanged without a mesh)."""
  if mesh is None or mesh.size == 1:
    return tree
  return jax.device_put(tree, replicated(mesh))
