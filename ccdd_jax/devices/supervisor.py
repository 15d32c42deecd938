"""Each process of a multi-process run ends in one line: a small supervisor around the JAX process.

JAX's distributed runtime ends a process from C++ when the run cannot go
on: a process that does not join within the join timeout (a coordinator that
cannot be reached, fewer processes than --num_processes), a process whose
heartbeats stop (killed, hung, its host gone), the coordinator (process 0)
gone, or processes that do not all reach the shutdown barrier at exit. It
logs "Terminating process because the JAX distributed service detected fatal
errors" with a stack trace and aborts; no Python code runs. So
`python -m ccdd_jax.main` in a multi-process run starts itself again as a
child (`run`, same arguments, CCDD_SUPERVISED=1) and only relays its output:
stdout untouched, stderr line by line until that message, which it replaces
by one `error: ...` line, then exits 1. A child that printed its own
`error: ...` line keeps it, and the supervisor adds nothing. The child dies
with the supervisor (PR_SET_PDEATHSIG on Linux), and the supervisor passes
SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 on, so a launcher that stops the
process it started stops the run; the child's exit status is the supervisor's
(a run stopped by SIGTERM with its state saved exits 75 through it, run/preemption.py).
"""

import ctypes
import os
import signal
import subprocess
import sys

ENV = "CCDD_SUPERVISED"
FATAL = b"Terminating process because the JAX distributed service detected fatal errors"
_PR_SET_PDEATHSIG = 1
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def supervised() -> bool:
  """Whether this process is the child of a supervisor (it runs JAX itself)."""
  return os.environ.get(ENV) == "1"


def _die_with_parent() -> None:
  """In the child, before exec: SIGKILL when the supervisor dies (Linux; elsewhere nothing)."""
  try:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except (OSError, AttributeError):
    pass


class Relay:
  """Copies the child's stderr through, up to JAX's fatal message; remembers what it saw.

  After the child's own `error: ...` line, what it prints while it stops is held
  back, and dropped if JAX's fatal message follows (the shutdown barrier's
  complaints), so that the child's line stays the last.
  """

  def __init__(self, out):
    self.out, self.pending = out, b""
    self.fatal: list[bytes] | None = None  # The fatal message and what follows it.
    self.child_error = False  # The child printed its own "error: ..." line.
    self.held: list[bytes] = []  # What the child printed after that line.

  def feed(self, data: bytes) -> None:
    """Takes a chunk of the child's stderr; writes out its complete lines."""
    self.pending += data
    while (cut := max(self.pending.rfind(b"\n"), self.pending.rfind(b"\r"))) >= 0:
      lines, self.pending = self.pending[: cut + 1], self.pending[cut + 1 :]
      for line in lines.splitlines(keepends=True):
        self._line(line)

  def _line(self, line: bytes) -> None:
    if self.fatal is None and FATAL in line:
      self.fatal = []
    if self.fatal is not None:
      self.fatal.append(line)
    elif self.child_error:
      self.held.append(line)
    else:
      self.child_error = line.startswith(b"error: ")
      self.out.write(line)
      self.out.flush()

  def close(self) -> None:
    """Writes out the last, unterminated line and, without a fatal message, what was held."""
    if self.pending:
      self._line(self.pending)
      self.pending = b""
    if self.fatal is None and self.held:
      self.out.write(b"".join(self.held))
      self.out.flush()


def fatal_reason(lines: list[bytes]) -> str:
  """The first line of the absl::Status in JAX's fatal message ("UNAVAILABLE: ...")."""
  text = b"".join(lines).decode(errors="replace")
  status = text.split("absl::Status:", 1)[-1].strip().splitlines()
  reason = status[0].strip() if status else "unknown"
  return reason[:200] + ("..." if len(reason) > 200 else "")


def message(settings, lines: list[bytes]) -> str:
  """The one-line error that replaces JAX's fatal message for this process."""
  who, n = settings.who(), settings.num_processes
  address, join = settings.coordinator_address or "the coordinator", settings.join_timeout
  if any(b"RegisterTask" in line for line in lines):  # Connecting: not everyone joined.
    ids = f"--process_id 0 to {n - 1}" if n else "one --process_id each"
    start = (
      f"start {n or 'all'} processes ({ids}), each with the same --coordinator_address "
      "and --num_processes"
    )
    if settings.process_id == 0:
      return f"{who}: not every process joined the run at {address} within {join} s: {start}"
    return (
      f"{who} could not join the run at {address} within {join} s: process 0 (the "
      f"coordinator) cannot be reached there, or not every process started: {start}"
    )
  return (
    f"{who}: another process of this run stopped or cannot be reached "
    f"({fatal_reason(lines)}); this one stops too (heartbeat timeout "
    f"{settings.heartbeat_timeout} s, launch/README.md)"
  )


def run(settings) -> int:
  """Runs this command again as a supervised child; returns the exit status to leave with."""
  argv = [sys.executable, *sys.orig_argv[1:]]
  child = subprocess.Popen(
    argv, env=dict(os.environ, **{ENV: "1"}), stderr=subprocess.PIPE, preexec_fn=_die_with_parent
  )
  for sig in _FORWARDED:
    signal.signal(sig, lambda s, _: child.send_signal(s))
  relay = Relay(sys.stderr.buffer)
  while chunk := os.read(child.stderr.fileno(), 65536):
    relay.feed(chunk)
  relay.close()
  code = child.wait()
  for sig in _FORWARDED:
    signal.signal(sig, signal.SIG_DFL)
  if relay.child_error:
    return code if code > 0 else 1
  if relay.fatal is not None:
    print(f"error: {message(settings, relay.fatal)}", file=sys.stderr, flush=True)
    return 1
  if code < 0:
    name = signal.Signals(-code).name
    print(f"error: {settings.who()} was stopped by {name}", file=sys.stderr, flush=True)
    return 128 - code
  return code
