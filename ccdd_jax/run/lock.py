"""One run per workdir: <workdir>/run.lock, held by `pipeline.run` from its checks to its return.

The lock file records its holder: host, pid, the process's start time
(/proc/<pid>/stat, so a reused pid is not taken for the holder), the boot and
pid namespace it counts in, a random token, since when and the stage. It is
created with O_CREAT | O_EXCL, so of several starters racing for a free
workdir exactly one wins (on NFS too), and a refused run writes nothing. It
is removed when the run returns or raises (`released_at_return`). While held,
a thread touches it every HEARTBEAT_SECONDS. A lock is stale, and is taken
over with a log line saying so, when

  - its holder ran on this machine (same host, boot and pid namespace) and
    that pid is gone, a zombie, or another process (another start time); or
  - it was not touched for STALE_AFTER_SECONDS: a run killed on another host
    (a requeued job) frees the workdir after that.

A takeover is serialised by a second file, run.lock.takeover (O_EXCL): its
holder re-reads the lock and, only if it is still the stale one, replaces it
by its own in one rename (the path is never free in between, so no O_EXCL
racer slips in); a racer that finds a live lock refuses. Only process 0 of a
multi-process run takes the lock (`sharding.is_writer`): the others share it.
"""

import _thread
from collections.abc import Callable
import contextvars
import functools
import json
import os
import pathlib
import secrets
import socket
import threading
import time
from typing import Any

from ccdd_jax import CCDDError
from ccdd_jax.devices import sharding
from ccdd_jax.log import log

FILE = "run.lock"
HEARTBEAT_SECONDS = 20.0
# Above NFS's attribute cache (60 s) plus a missed beat or two.
STALE_AFTER_SECONDS = 120.0
_GUARD_STALE_SECONDS = 10.0  # A takeover holds its guard for milliseconds.
_ATTEMPTS = 50

# The locks taken inside the innermost `released_at_return` call of this thread.
_HELD: contextvars.ContextVar[list | None] = contextvars.ContextVar("ccdd_run_locks", default=None)


def _read_text(path: str) -> str | None:
  try:
    return pathlib.Path(path).read_text().strip()
  except OSError:
    return None


def _proc_stat(pid: int) -> tuple[bool, str | None] | None:
  """(alive, start time in clock ticks since boot) of `pid` from /proc; None without /proc."""
  try:
    text = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except FileNotFoundError:
    return (False, None) if os.path.isdir("/proc/self") else None
  except OSError:
    return None
  fields = text[text.rindex(")") + 2 :].split()  # The command may hold spaces and parentheses.
  return fields[0] not in ("Z", "X"), fields[19]  # Fields 3 (state) and 22 (starttime).


def _gone(pid: int, start: str | None) -> str | None:
  """Why process `pid` of this machine is not the holder that started at `start`, or None."""
  stat = _proc_stat(pid)
  if stat is None:  # No /proc (macOS): liveness only, a reused pid looks alive.
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return "that process is gone"
    except PermissionError:
      pass
    return None
  if not stat[0]:
    return "that process is gone"
  if start is not None and stat[1] != start:
    return f"pid {pid} is another process now"
  return None


def _machine() -> dict:
  """Where this process counts pids: its host, boot and pid namespace (None where unknown)."""
  try:
    pid_ns = os.readlink("/proc/self/ns/pid")
  except OSError:
    pid_ns = None
  boot = _read_text("/proc/sys/kernel/random/boot_id")
  return {"host": socket.gethostname(), "boot": boot, "pid_ns": pid_ns}


def whoami(stage: str) -> dict:
  """This process's lock record."""
  stat = _proc_stat(os.getpid())
  return {
    "format": 1,
    **_machine(),
    "pid": os.getpid(),
    "start": stat[1] if stat else None,
    "token": secrets.token_hex(8),
    "since": time.time(),
    "stage": stage,
  }


def _utc(seconds: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def _create(path: pathlib.Path, record: dict) -> bool:
  """Creates `path` holding `record` unless it exists (O_CREAT | O_EXCL: one racer wins)."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())
  return True


def _read(path: pathlib.Path) -> tuple[dict | None, float] | None:
  """(record or None if unreadable, mtime) of a lock file; None when there is none."""
  for _ in range(20):  # A file just created may not hold its record yet.
    try:
      mtime, text = path.stat().st_mtime, path.read_text()
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
      if isinstance(record, dict) and {"host", "pid", "token", "since"} <= set(record):
        return record, mtime
    except ValueError:
      pass
    if time.time() - mtime > _GUARD_STALE_SECONDS:
      break
    time.sleep(0.05)
  return None, mtime


def _stale(record: dict | None, mtime: float, stale_after: float) -> str | None:
  """Why a lock's holder is gone (a log line's reason), or None while it may be running."""
  me = _machine()
  if record is None:
    silent = time.time() - mtime
    return f"unreadable and untouched for {silent:.0f} s" if silent > stale_after else None
  here = record["host"] == me["host"]
  if here and record.get("boot") and me["boot"] and record["boot"] != me["boot"]:
    return "this host has rebooted since"
  if here and record.get("pid_ns") == me["pid_ns"]:
    return _gone(int(record["pid"]), record.get("start"))
  silent = time.time() - mtime
  return f"no heartbeat for {silent:.0f} s" if silent > stale_after else None


def _busy(workdir: pathlib.Path, record: dict | None, mtime: float) -> CCDDError:
  """The one-line refusal naming the holder."""
  path = pathlib.Path(workdir) / FILE
  if record is None:
    return CCDDError(
      f"workdir {workdir} is locked by {path}, being written or unreadable (modified "
      f"{_utc(mtime)}): one run per workdir; remove it if no run is using the workdir"
    )
  beat = time.time() - mtime
  return CCDDError(
    f"workdir {workdir} is in use by pid {record['pid']} on host {record['host']} since "
    f"{_utc(record['since'])} (--stage={record.get('stage', '?')}, last heartbeat {beat:.0f} s "
    f"ago): one run per workdir; wait for it, or remove {path} if that run is gone"
  )


class Lock:
  """A held workdir lock: its file, our record, the heartbeat thread."""

  def __init__(self, path: pathlib.Path, record: dict, heartbeat: float):
    self.path, self.record = path, record
    self._stop = threading.Event()
    self._thread = threading.Thread(
      target=self._beat, args=(heartbeat,), name="ccdd-run-lock", daemon=True
    )
    self._thread.start()

  def held(self) -> bool:
    """Whether the lock file is still ours."""
    found = _read(self.path)
    return bool(found and found[0] and found[0]["token"] == self.record["token"])

  def _beat(self, every: float) -> None:
    """Touches the lock every `every` s; stops this run if another one took the lock over."""
    while not self._stop.wait(every):
      if not self.path.exists() and _create(self.path, self.record):
        log(f"[lock] {self.path} was removed while this run holds it: written again")
      if not self.held():
        log(f"[lock] {self.path} was taken over by another run: stopping this one")
        _thread.interrupt_main()
        return
      try:
        os.utime(self.path)
      except OSError:
        pass

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still ours."""
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join()
    if self.held():
      self.path.unlink(missing_ok=True)


def _take_over(path: pathlib.Path, stale: dict | None, mine: dict) -> bool:
  """Replaces the stale lock `stale` by ours, unless another starter did something first."""
  guard = path.with_name(path.name + ".takeover")
  if not _create(guard, mine):
    found = _read(guard)
    if found and _stale(found[0], found[1], _GUARD_STALE_SECONDS):
      guard.unlink(missing_ok=True)  # Left by a starter killed mid-takeover.
    return False
  try:
    found = _read(path)
    same = found is not None and (
      found[0]["token"] == stale["token"] if found[0] and stale else found[0] is stale
    )
    if not same:
      return False  # Taken over or released meanwhile: look again.
    # Replaced in one rename, never removed: a racer's O_EXCL create cannot slip in between.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{mine['token']}.tmp")
    if not _create(tmp, mine):
      return False
    os.replace(tmp, path)
    return True
  finally:
    guard.unlink(missing_ok=True)


def acquire(
  workdir: str | os.PathLike,
  stage: str = "all",
  heartbeat: float = HEARTBEAT_SECONDS,
  stale_after: float = STALE_AFTER_SECONDS,
) -> Lock:
  """Takes `workdir`'s lock, or raises a one-line CCDDError naming the run that holds it."""
  workdir = pathlib.Path(workdir)
  path, mine = workdir / FILE, whoami(stage)
  for _ in range(_ATTEMPTS):
    if _create(path, mine):
      return Lock(path, mine, heartbeat)
    found = _read(path)
    if found is None:
      continue  # Released meanwhile.
    record, mtime = found
    why = _stale(record, mtime, stale_after)
    if why is None:
      raise _busy(workdir, record, mtime)
    if _take_over(path, record, mine):
      holder = f"pid {record['pid']} on host {record['host']}" if record else "an unknown run"
      log(f"[lock] took over the stale lock {path} of {holder} ({why})")
      return Lock(path, mine, heartbeat)
    time.sleep(0.01 + 0.05 * secrets.randbelow(100) / 100)
  raise CCDDError(f"could not take the lock {path}: other runs keep racing for it; retry")


def released_at_return(function: Callable) -> Callable:
  """Decorates `function` so that the locks `hold` takes in its call are released when it
  returns or raises."""

  @functools.wraps(function)
  def wrapper(*args, **kwargs) -> Any:
    token = _HELD.set([])
    try:
      return function(*args, **kwargs)
    finally:
      locks = _HELD.get()
      _HELD.reset(token)
      for lock in reversed(locks):
        lock.release()

  return wrapper


def hold(workdir: str | os.PathLike, stage: str = "all") -> Lock | None:
  """`acquire` on process 0 (the others share its lock), released when the enclosing
  `released_at_return` function returns."""
  held = _HELD.get()
  if held is None:
    raise ValueError("lock.hold must be called inside a function decorated with released_at_return")
  if not sharding.is_writer():
    return None
  lock = acquire(workdir, stage)
  held.append(lock)
  return lock
