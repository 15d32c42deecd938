"""Preemption: SIGTERM or SIGINT stops a run at its next step boundary, its state saved there.

`handled` (around pipeline.run) installs handlers that only record the first
signal. The stages poll `should_stop` at their step boundaries: after every
expert epoch (before the next one starts), every distillation iteration, every
evaluated (architecture, set), and between stages. Where it says stop, the
stage saves its state at that point (an expert epoch is saved anyway; the
distillation state at that iteration, whatever `distill.checkpoint_every`; an
evaluation once its set is written), its atomic writes done, and raises
`Preempted`; `python -m ccdd_jax.main` logs one line (`message`) and exits with
EXIT_CODE. The same command resumes from that point, bit for bit.

Later signals are ignored while the run stops: a launcher or a terminal often
signals both a process and its supervisor, which passes the signal on, so two
arrive at once. `kill -9` stops at once; the last saved state is kept (the
next run resumes from there). Stages without steps (keygen, queries, verify,
attacks) finish first. In a multi-process run every process must stop at the
same boundary, or a collective would wait forever: there `should_stop`
gathers every process's flag (a one-byte all-gather per call, in the order
every process makes its calls) and all stop when any was signalled.
"""

from collections.abc import Callable
import contextlib
import functools
import signal
import threading
from typing import Any

import numpy as np

from ccdd_jax import Preempted
from ccdd_jax.devices import sharding

# The exit status of a run stopped by a signal with its state saved: EX_TEMPFAIL (sysexits.h),
# "try again later". launch/slurm_2nodes.sbatch requeues the job on it.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)

_received: list[str] = []  # The first signal's name, once one arrived.


def _record(signum: int, _frame: Any) -> None:
  """The handler: records the first signal's name; nothing else."""
  if not _received:
    _received.append(signal.Signals(signum).name)


def received() -> str | None:
  """The name of the signal this process received ("SIGTERM"), or None."""
  return _received[0] if _received else None


def should_stop() -> bool:
  """Whether the run stops at this step boundary: a signal arrived (on any process of the run)."""
  stop = bool(_received)
  if not sharding.multi_process():
    return stop
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  return bool(np.any(multihost_utils.process_allgather(np.asarray([stop], np.uint8))))


def handled(function: Callable) -> Callable:
  """Decorates `function` (pipeline.run) so that SIGTERM and SIGINT only set the flag while it
  runs; the previous handlers and a clear flag are back when it returns or raises."""

  @functools.wraps(function)
  def wrapper(*args, **kwargs) -> Any:
    if threading.current_thread() is not threading.main_thread():
      return function(*args, **kwargs)  # Python runs signal handlers in the main thread only.
    previous = {sig: signal.signal(sig, _record) for sig in SIGNALS}
    try:
      return function(*args, **kwargs)
    except Preempted as stopped:
      stopped.signal = stopped.signal or received() or "a signal to another process of this run"
      raise
    finally:
      for sig, handler in previous.items():  # None: a handler set outside Python (C++).
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
      _received.clear()

  return wrapper


@contextlib.contextmanager
def stage(name: str):
  """Names the stage in a `Preempted` raised inside."""
  try:
    yield
  except Preempted as stopped:
    stopped.stage = stopped.stage or name
    raise


@contextlib.contextmanager
def naming(part: str):
  """Adds `part` to the point of a `Preempted` raised inside ("at iteration 3 of 4 (part)")."""
  try:
    yield
  except Preempted as stopped:
    stopped.point = f"{stopped.point} ({part})"
    raise


def between_stages(name: str) -> None:
  """After stage `name`, with more to run: raises Preempted if the run should stop."""
  if should_stop():
    raise Preempted("", name)


def message(stopped: Preempted) -> str:
  """The one line a stopped run logs: where it stopped and how to resume."""
  where = f"during {stopped.stage} {stopped.point}" if stopped.point else f"after {stopped.stage}"
  return f"stopped by {stopped.signal} {where}; state saved: rerun the same command to resume"
