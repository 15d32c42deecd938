"""Devices and hosts: JAX's own multi-device engine (a Mesh, NamedSharding), nothing more.

One mesh axis, "devices", over every device of every process. What is
spread over it:

  experts     the expert axis of a vmapped group (each device trains a slice)
  distill     the synthetic minibatch inside each student step (data
              parallel: parameters replicated, gradients summed by XLA), so
              the algorithm is exactly the one-device algorithm
  evaluate    the seeds axis of the vmapped networks

With one device (a mesh of size 1, or none) every helper here leaves the
computation exactly as it was: the same programs, bit for bit. With more,
results equal the one-device ones to float32 rounding (reductions are summed
in another order), which tests/test_sharding.py checks on simulated devices.

Multi-host runs call `jax.distributed.initialize()` first: auto-detected on
Slurm, TPU pods and Open MPI (`maybe_initialize_distributed("auto")`), or
forced with `--distributed=on`. Only process 0 writes files (`is_writer`);
`barrier` keeps the processes in step between stages. docs/scaling.md has
the measured figures; launch/ the launch scripts.
"""

import math
import os

import jax
import jax.numpy as jnp
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


def multi_process() -> bool:
  """Whether this run spans several processes (hosts)."""
  return jax.process_count() > 1


def is_writer() -> bool:
  """Whether this process writes reports and files (process 0 only)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here for each other (nothing to wait for in a one-process run)."""
  if multi_process():
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    multihost_utils.sync_global_devices(name)


def resolve_mesh(num_devices: int = 0) -> Mesh:
  """The run's mesh: `num_devices` devices (0 = every device of every process)."""
  devices = jax.devices()
  if num_devices < 0 or num_devices > len(devices):
    raise CCDDError(
      f"num_devices = {num_devices}: this run has {len(devices)} "
      f"{jax.default_backend()} device(s) (0 = all of them)"
    )
  if num_devices and num_devices != len(devices) and multi_process():
    raise CCDDError(f"num_devices = {num_devices}: a multi-process run uses all its devices (0)")
  return make_mesh(devices[: num_devices or len(devices)])


def size(mesh: Mesh | None) -> int:
  """The number of devices of `mesh` (1 without one)."""
  return 1 if mesh is None else mesh.size


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


def _global_input(tree):
  """In a multi-process run, this process's arrays as numpy (the same value on every process).

  jax.device_put makes a global array of host data; an array on one of this
  process's devices is fetched first. Arrays that already span processes stay.
  """
  if not multi_process():
    return tree
  local = lambda x: isinstance(x, jax.Array) and x.is_fully_addressable
  return jax.tree_util.tree_map(lambda x: np.asarray(x) if local(x) else x, tree)


def put_leading(tree, mesh: Mesh | None):
  """`tree` on the mesh, leaves split along their first axis (unchanged on one device)."""
  if size(mesh) == 1:
    return tree
  return jax.device_put(_global_input(tree), shard_leading(mesh))


def put_replicated(tree, mesh: Mesh | None):
  """`tree` replicated on every device of the mesh (unchanged on one device)."""
  if size(mesh) == 1:
    return tree
  return jax.device_put(_global_input(tree), replicated(mesh))


def to_device(tree, mesh: Mesh | None):
  """`tree` on the device(s): the default device, or replicated over a mesh of several."""
  return jax.device_put(tree) if size(mesh) == 1 else put_replicated(tree, mesh)


def padded_size(n: int, mesh: Mesh | None) -> int:
  """`n` rounded up to a multiple of the mesh's size."""
  return math.ceil(n / size(mesh)) * size(mesh)


def pad_leading(tree, mesh: Mesh | None):
  """Leaves' first axis padded (repeating the last entry) to a multiple of the mesh's size.

  The padded entries are computed and dropped (`unpad`): the expert and seed
  axes are independent programs, so padding never changes the real entries'
  values. Nothing changes on one device.
  """
  n = jax.tree_util.tree_leaves(tree)[0].shape[0]
  extra = padded_size(n, mesh) - n
  if not extra:
    return tree
  return jax.tree_util.tree_map(
    lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)]), tree
  )


def unpad(tree, n: int):
  """The first `n` entries of every leaf (undoes `pad_leading`)."""
  return jax.tree_util.tree_map(lambda x: x[:n], tree)


def to_host(tree):
  """`tree` as numpy arrays on this host; arrays spread over other processes are gathered."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree_util.tree_map(one, tree)


def constrain_batch(x: jax.Array, mesh: Mesh | None) -> jax.Array:
  """Inside jit: `x` split along its first (batch) axis over the mesh (data parallel).

  The rest of the computation (replicated parameters) follows from XLA's
  sharding propagation; gradients with respect to replicated values are
  summed over devices. Unchanged on one device.
  """
  if size(mesh) == 1:
    return x
  return jax.lax.with_sharding_constraint(x, shard_leading(mesh))


def check_batch(batch: int, mesh: Mesh | None, what: str) -> None:
  """A one-line CCDDError unless `batch` examples split evenly over the mesh."""
  if batch % size(mesh):
    raise CCDDError(
      f"{what} = {batch} does not split over {size(mesh)} devices: make it a multiple "
      f"of {size(mesh)} or run on fewer devices (--num_devices)"
    )
