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

Multi-process runs call `jax.distributed.initialize()` first
(`initialize_distributed`, with the `hosts.Settings` of --distributed and
--coordinator_address / --num_processes / --process_id, or of Slurm, Open MPI
or a TPU pod; CPU collectives over gloo), then check that every process has
the same key and flags (`check_same_run`). Only process 0 writes files
(`is_writer`); `barrier` keeps the processes in step between stages.
docs/scaling.md has the measured figures; launch/ the launch scripts.
"""

import hashlib
import math
import pathlib

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.devices import hosts

AXIS = "devices"

detected_launcher = hosts.detected_launcher


def initialize_distributed(settings: hosts.Settings | None) -> bool:
  """`jax.distributed.initialize(**settings.initialize_kwargs())`, CPU collectives over gloo.

  Returns whether this is a multi-process run (None: one process, nothing to
  do). Must run before any other JAX call. Then every process checks that all
  were started with the same process count (one-line CCDDError on each otherwise).
  """
  if settings is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**settings.initialize_kwargs())
  except Exception as e:  # JAX raises assorted types when the cluster is not reachable.
    lines = str(e).strip().splitlines()
    busy = "Failed to start RPC server" in str(e)  # Process 0 could not listen on the port.
    raise CCDDError(
      f"jax.distributed.initialize() failed ({settings.source}): "
      f"{lines[0] if lines else type(e).__name__}"
      + (f" (is {settings.coordinator_address} this host, its port free?)" if busy else "")
    ) from e
  _agree(["process counts"], [str(settings.num_processes or jax.process_count())])
  return multi_process()


def maybe_initialize_distributed(mode: str) -> bool:
  """`initialize_distributed` for --distributed=`mode` and the launcher's environment alone."""
  return initialize_distributed(hosts.resolve(mode))


def shutdown_distributed() -> None:
  """Leaves the run (all processes wait for each other, at most the heartbeat timeout)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def _digests(values: list[str | bytes | None]) -> np.ndarray:
  """[len(values), 32] uint8 SHA-256 digests; zeros for None (absent)."""
  rows = [
    np.zeros(32, np.uint8)
    if v is None
    else np.frombuffer(hashlib.sha256(v if isinstance(v, bytes) else v.encode()).digest(), np.uint8)
    for v in values
  ]
  return np.stack(rows)


def _gather(values: list[str | bytes | None]) -> np.ndarray:
  """[processes, len(values), 32]: every process's digests of its `values`."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return np.asarray(multihost_utils.process_allgather(_digests(values), tiled=False))


def _agree(names: list[str], values: list[str | bytes]) -> None:
  """A one-line CCDDError on every process unless all processes hold the same `values`."""
  table = _gather(values)
  for j, name in enumerate(names):
    odd = [p for p in range(len(table)) if not np.array_equal(table[p, j], table[0, j])]
    if odd:
      raise CCDDError(
        f"the {len(table)} processes were started with different {name} (process {odd[0]} "
        "differs from process 0): start every process with the same flags"
      )


def check_same_run(key_file: pathlib.Path, **facts: str) -> None:
  """In a multi-process run: a one-line CCDDError on every process unless each has
  `key_file` holding the same key, and the same `facts` (the config, the stage, ...)."""
  if not multi_process():
    return
  key_file = pathlib.Path(key_file)
  table = _gather([key_file.read_bytes() if key_file.is_file() else None])
  n, missing = len(table), [p for p in range(len(table)) if not table[p, 0].any()]
  how = "make it first with one process (--stage=keygen --distributed=off), launch/README.md"
  if jax.process_index() in missing:
    raise CCDDError(f"no key file at {key_file}: a run of {n} processes reads one key; {how}")
  if missing:
    raise CCDDError(
      f"process {missing[0]} of {n} has no key file (its --key_file or <workdir>/owner.key): "
      f"every process reads the same key; {how}"
    )
  _agree(["keys", *facts], [key_file.read_bytes(), *facts.values()])


def peer_failure(error: BaseException) -> str | None:
  """How an exception says that another process of the run is gone (None if it does not)."""
  text = str(error).strip()
  signs = ("Gloo", "Connection closed by peer", "Connection reset by peer", "UNAVAILABLE")
  if not multi_process() or not any(sign in text for sign in signs):
    return None
  first = text.splitlines()[0] if text else type(error).__name__
  return (
    f"process {jax.process_index()} of {jax.process_count()}: another process of this run "
    f"stopped ({first[:200]}); this one stops too"
  )


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
