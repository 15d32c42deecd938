"""Memory readings: XLA's memory analysis, /proc's resident set and high-water mark, and
a child process watched for resident memory and running time.

Host figures come from Linux's /proc: the peak of one run is the growth of
the resident set over it (VmHWM - VmRSS, the high-water mark reset just
before the run through /proc/self/clear_refs). Device figures come from the
allocator (JAX's `memory_stats()`, torch's `max_memory_allocated()`).
"""

from collections.abc import Callable, Sequence
import json
import os
import subprocess
import time

import jax

DEVICE_METHOD = "device allocator peak bytes in use"


def xla_memory(compiled) -> dict:
  """Sizes from XLA's memory analysis of a compiled executable, if it has one."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return {}
  if analysis is None:
    return {}
  fields = (
    "temp_size_in_bytes",
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "generated_code_size_in_bytes",
  )
  return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


def rss_kib(pid: int) -> int:
  """Resident set of process `pid` in KiB (0 when it is gone)."""
  try:
    with open(f"/proc/{pid}/status") as status:
      for line in status:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def available_kib() -> int:
  """MemAvailable of this machine in KiB."""
  with open("/proc/meminfo") as meminfo:
    for line in meminfo:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1])
  return 0


def _status_kib() -> dict:
  """VmRSS and VmHWM of this process, in KiB."""
  values = {}
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith(("VmRSS:", "VmHWM:")):
        key, value = line.split(":")
        values[key] = int(value.split()[0])
  return values


def host_peak(run: Callable[[], object]) -> dict:
  """Growth of this process's resident set over `run()` (bytes), and how it was measured."""
  try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
      clear_refs.write("5")  # Resets VmHWM to the current VmRSS.
    method = "VmHWM - VmRSS over the run (high-water mark reset before it)"
  except OSError:
    method = "VmHWM - VmRSS over the run (high-water mark NOT reset: includes set-up)"
  before = _status_kib()
  run()
  after = _status_kib()
  return {
    "peak_bytes": 1024 * (after["VmHWM"] - before["VmRSS"]),
    "rss_before_bytes": 1024 * before["VmRSS"],
    "method": method,
  }


def jax_device_peak(run: Callable[[], object]) -> dict:
  """JAX's first device's peak bytes in use after `run()`."""
  run()
  stats = jax.devices()[0].memory_stats() or {}
  return {"peak_bytes": stats.get("peak_bytes_in_use"), "method": DEVICE_METHOD}


def torch_device_peak(torch, run: Callable[[], object]) -> dict:
  """torch's CUDA peak bytes allocated over `run()`."""
  torch.cuda.reset_peak_memory_stats()
  run()
  return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "method": DEVICE_METHOD}


def run_watched(
  command: Sequence[str], env: dict, out_path: str, max_rss_kib: int, timeout_s: float
) -> tuple[dict, str | None, int]:
  """Runs `command`, killed past `max_rss_kib` or `timeout_s`: (its JSON, killed_for, status).

  The JSON is what the child wrote to `out_path` ({} if nothing): complete,
  or what a killed child wrote before its run. `killed_for` is None,
  "memory" or "time"; the status is the child's exit status.
  """
  begin = time.monotonic()
  process = subprocess.Popen(list(command), env=env)
  killed_for = None
  while True:
    try:
      process.wait(timeout=0.25)
      break
    except subprocess.TimeoutExpired:
      pass
    if rss_kib(process.pid) > max_rss_kib:
      killed_for = "memory"
    elif time.monotonic() - begin > timeout_s:
      killed_for = "time"
    if killed_for:
      process.kill()
      process.wait()
      break
  written = {}
  if os.path.exists(out_path):
    with open(out_path) as result_file:
      written = json.load(result_file)
  return written, killed_for, process.returncode
