"""Which processes make up a run: the arguments of `jax.distributed.initialize`, without JAX.

`resolve` turns --distributed (auto | on | off), the explicit flags
--coordinator_address / --num_processes / --process_id and the launcher's
environment into `Settings`, or None for a one-process run:

  flags      --coordinator_address HOST:PORT --num_processes N --process_id I
             (any machine, e.g. two processes on this one: launch/README.md);
             a flag wins over what a launcher says
  Slurm      SLURM_NTASKS processes, SLURM_PROCID; the coordinator is the first
             host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST, SLURM_NODELIST)
             on port JAX_COORDINATOR_PORT or 61440 + SLURM_JOB_ID % 4096 (JAX's rule)
  Open MPI   OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_RANK; the coordinator from
             OMPI_MCA_orte_hnp_uri (JAX's rule), else --coordinator_address
  TPU pod    TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES), TPU_WORKER_ID (or
             CLOUD_TPU_TASK_ID); the coordinator is MEGASCALE_COORDINATOR_ADDRESS
             or the first worker, on port JAX_COORDINATOR_PORT or 8482 (JAX's)

JAX_COORDINATOR_ADDRESS, which JAX itself reads, stands in for
--coordinator_address. With every value known, `initialize_kwargs` switches
JAX's own cluster detection off, so what `dry_run_line` prints is exactly
what reaches `jax.distributed.initialize`; and each process sees all of its
local devices (one process per node; JAX_LOCAL_DEVICE_IDS, which JAX reads,
narrows them). `--distributed=on` with nothing known leaves the detection to
JAX (a Cloud TPU VM's metadata).

Bounded waits (`Settings`): every process must join within `join_timeout`
(default 300 s: slow imports on a shared file system); a process silent for
`heartbeat_timeout` (default 60 s) is dead and the others stop, and at exit
the processes wait at most that long for each other. A process that dies
inside a collective is noticed at once (its sockets close); see
devices/supervisor.py for how each of these ends in one line.
"""

import dataclasses
import json
import os
import sys

from ccdd_jax import CCDDError

JOIN_TIMEOUT = 300
HEARTBEAT_TIMEOUT = 60
SLURM_PORT_BASE = 65535 - 2**12 + 1  # JAX's Slurm and Open MPI ports: 61440 + job id % 4096.
TPU_PORT = 8482  # JAX's coordinator port on a TPU pod.

# Environment variables that a multi-process launcher sets, and the count they carry.
_LAUNCHERS = {
  "Slurm": "SLURM_NTASKS",
  "Open MPI": "OMPI_COMM_WORLD_SIZE",
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """One process's place in a multi-process run (None: left to JAX's own detection)."""

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  source: str  # "flags", "Slurm", "Open MPI", "TPU pod", "flags and Slurm", "JAX's detection".
  join_timeout: int = JOIN_TIMEOUT
  heartbeat_timeout: int = HEARTBEAT_TIMEOUT

  def initialize_kwargs(self) -> dict:
    """The keyword arguments of `jax.distributed.initialize` for this process."""
    known = None not in (self.coordinator_address, self.num_processes, self.process_id)
    kwargs = {
      "coordinator_address": self.coordinator_address,
      "num_processes": self.num_processes,
      "process_id": self.process_id,
    }
    return {
      **(kwargs if known else {}),
      **({"cluster_detection_method": "deactivate"} if known else {}),
      "initialization_timeout": self.join_timeout,
      "heartbeat_timeout_seconds": self.heartbeat_timeout,
      "shutdown_timeout_seconds": self.heartbeat_timeout,
    }

  def who(self) -> str:
    """'process 1 of 2' (question marks where JAX's detection decides)."""
    show = lambda v: "?" if v is None else v
    return f"process {show(self.process_id)} of {show(self.num_processes)}"


def _hosts(value: str) -> list[str]:
  return [h.strip() for h in value.split(",") if h.strip()]


def detected_launcher(environ=None) -> str | None:
  """The multi-process launcher this process runs under, if any (Slurm, Open MPI, TPU pod)."""
  environ = os.environ if environ is None else environ
  for name, variable in _LAUNCHERS.items():
    if int(environ.get(variable, "1") or "1") > 1:
      return name
  if len(_hosts(environ.get("TPU_WORKER_HOSTNAMES", ""))) > 1:
    return "TPU pod"
  return None


def first_slurm_host(nodelist: str) -> str:
  """The first host of a Slurm node list: 'gpu[003-004,9],cpu1' -> 'gpu003'."""
  depth, end = 0, len(nodelist)
  for i, ch in enumerate(nodelist):
    depth += (ch == "[") - (ch == "]")
    if ch == "," and depth == 0:
      end = i
      break
  first = nodelist[:end].strip()
  if "[" not in first:
    return first
  prefix, rest = first.split("[", 1)
  ranges, suffix = rest.split("]", 1)
  return prefix + ranges.split(",")[0].split("-")[0] + suffix


def _int(environ, name: str) -> int | None:
  value = environ.get(name)
  if value is None or value.strip() == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise CCDDError(f"{name}={value!r} is not an integer") from None


def _slurm(environ) -> tuple[str | None, int | None, int | None]:
  nodes = next(
    (
      environ[v]
      for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
      if v in environ
    ),
    None,
  )
  port = environ.get("JAX_COORDINATOR_PORT")
  if port is None and _int(environ, "SLURM_JOB_ID") is not None:
    port = str(_int(environ, "SLURM_JOB_ID") % 2**12 + SLURM_PORT_BASE)
  address = f"{first_slurm_host(nodes)}:{port}" if nodes and port else None
  return address, _int(environ, "SLURM_NTASKS"), _int(environ, "SLURM_PROCID")


def _open_mpi(environ) -> tuple[str | None, int | None, int | None]:
  address, uri = None, environ.get("OMPI_MCA_orte_hnp_uri", "")
  job = uri.split(".", 1)[0]
  if ";tcp://" in uri and job.isdigit():  # "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
    host = uri.split(";tcp://", 1)[1].split(",")[0].rsplit(":", 1)[0]
    port = environ.get("JAX_COORDINATOR_PORT") or str(int(job) // 2**12 % 2**12 + SLURM_PORT_BASE)
    address = f"{host}:{port}"
  return address, _int(environ, "OMPI_COMM_WORLD_SIZE"), _int(environ, "OMPI_COMM_WORLD_RANK")


def _tpu_pod(environ) -> tuple[str | None, int | None, int | None]:
  hosts = _hosts(environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES", ""))
  worker = _int(environ, "TPU_WORKER_ID")
  worker = _int(environ, "CLOUD_TPU_TASK_ID") if worker is None else worker
  host = environ.get("MEGASCALE_COORDINATOR_ADDRESS") or (hosts[0] if hosts else "")
  port = environ.get("JAX_COORDINATOR_PORT") or str(TPU_PORT)
  address = f"{host.split(':')[0]}:{port}" if host else None
  return address, len(hosts) or None, worker


_FROM_LAUNCHER = {"Slurm": _slurm, "Open MPI": _open_mpi, "TPU pod": _tpu_pod}


def _check(settings: Settings) -> Settings:
  """One-line errors for values that cannot make a run."""
  n, i, address = settings.num_processes, settings.process_id, settings.coordinator_address
  what = "--num_processes" if "flags" in settings.source else f"the {settings.source} process count"
  if n is not None and n < 1:
    raise CCDDError(f"{what} = {n}: use 1 or more")
  if i is not None and n is not None and not 0 <= i < n:
    raise CCDDError(f"--process_id = {i} with {n} processes: use 0 to {n - 1} ({settings.source})")
  host, _, port = (address or "").rpartition(":")
  if address is not None and (not host or not port.isdigit() or not 0 < int(port) < 65536):
    raise CCDDError(f"--coordinator_address = {address!r}: use HOST:PORT, e.g. localhost:12355")
  if settings.join_timeout < 1 or settings.heartbeat_timeout < 1:
    raise CCDDError("--join_timeout and --heartbeat_timeout are seconds: use 1 or more")
  return settings


def resolve(
  mode: str,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  join_timeout: int | None = None,
  heartbeat_timeout: int | None = None,
  environ=None,
) -> Settings | None:
  """This process's `Settings` in a multi-process run, or None when it runs alone.

  mode "off": alone; "auto": several processes when flags or a launcher
  (`detected_launcher`) say so; "on": always (JAX's detection fills what is unknown).
  Timeouts in seconds; None: JOIN_TIMEOUT, HEARTBEAT_TIMEOUT.
  """
  if mode not in ("auto", "on", "off"):
    raise CCDDError(f"--distributed={mode!r}: use auto, on or off")
  environ = os.environ if environ is None else environ
  explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes}
  explicit["process_id"] = process_id
  given = [f"--{k}" for k, v in explicit.items() if v is not None]
  if mode == "off":
    if given:
      raise CCDDError(f"--distributed=off with {', '.join(given)}: drop them, or use auto")
    return None
  launcher = detected_launcher(environ)
  if mode == "auto" and launcher is None and not given:
    return None
  found = _FROM_LAUNCHER[launcher](environ) if launcher else (None, None, None)
  values = dict(zip(explicit, found))
  values["coordinator_address"] = (
    environ.get("JAX_COORDINATOR_ADDRESS") or values["coordinator_address"]
  )
  values.update({k: v for k, v in explicit.items() if v is not None})
  source = " and ".join(s for s in ("flags" * bool(given), launcher) if s) or "JAX's detection"
  timeouts = {
    "join_timeout": JOIN_TIMEOUT if join_timeout is None else join_timeout,
    "heartbeat_timeout": HEARTBEAT_TIMEOUT if heartbeat_timeout is None else heartbeat_timeout,
  }
  settings = _check(Settings(**values, source=source, **timeouts))
  missing = [f"--{k}" for k, v in values.items() if v is None]
  if missing and (given or launcher):
    raise CCDDError(
      f"a multi-process run ({source}) needs {', '.join(missing)}: pass "
      f"{'it' if len(missing) == 1 else 'them'} (launch/README.md)"
    )
  if settings.num_processes == 1:
    return None  # One process: nothing to join.
  return settings


def dry_run_line(settings: Settings | None, argv: list[str] | None = None) -> str:
  """One JSON line: the command line and what would reach `jax.distributed.initialize`."""
  argv = list(sys.orig_argv if argv is None else argv)
  record = {
    "dry_run": True,
    "argv": argv,
    "distributed": settings is not None,
    "source": settings.source if settings else None,
    "initialize": settings.initialize_kwargs() if settings else None,
    "local_device_ids": os.environ.get("JAX_LOCAL_DEVICE_IDS"),
    "cpu_collectives": "gloo",
  }
  return json.dumps(record, sort_keys=True)
