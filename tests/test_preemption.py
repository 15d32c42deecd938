"""Preemption: SIGTERM in each stage saves the state at that step, exits 75, and a rerun
gives the uninterrupted run's outputs bit for bit; the flag and handlers on their own."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import chex
import conftest
import pytest
from test_resume import TINY
from test_resume import _figures

from ccdd_jax import Preempted
from ccdd_jax.run import preemption
from ccdd_jax.run import resume

REPO = conftest.REPO
LINE = re.compile(
  r"^stopped by SIGTERM (during|after) (\S+) ?(.*); state saved: rerun the same command to resume$"
)

# `python -c SIGNAL_WHEN CALLER CONDITION ARGS...` is `python -m ccdd_jax.main ARGS...` that sends
# itself SIGTERM the first time the function CALLER asks `preemption.should_stop()` where
# CONDITION holds over its variables (run_group: before an expert epoch `e` of group `s` of
# `kind`; distill: after iteration `it`; stage_evaluate: after set `name`), and waits until the
# handler recorded it: the signal lands at that step, whatever the timing and the threads.
SIGNAL_WHEN = r"""
import os, runpy, signal, sys, time
caller, condition = sys.argv.pop(1), sys.argv.pop(1)
from ccdd_jax.run import preemption
real = preemption.should_stop
def should_stop():
  frame = sys._getframe(1)
  if frame.f_code.co_name == caller and eval(condition, {}, dict(frame.f_locals)):
    if preemption.received() is None:
      os.kill(os.getpid(), signal.SIGTERM)
      while preemption.received() is None:
        time.sleep(0.001)
  return real()
preemption.should_stop = should_stop
runpy.run_module("ccdd_jax.main", run_name="__main__", alter_sys=True)
"""


def run_cli(workdir: pathlib.Path, key: pathlib.Path, signal_when: tuple[str, str] = ()):
  """The tiny run through `python -m ccdd_jax.main` (SIGTERM at `signal_when`); (status, log)."""
  runner = ["-c", SIGNAL_WHEN, *signal_when] if signal_when else ["-m", "ccdd_jax.main"]
  argv = [sys.executable, *runner, f"--workdir={workdir}", "--key_file", str(key)]
  argv += [f"--config={conftest.TINY_BASE}", *(f"--config.{o}" for o in TINY)]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  return out.returncode, out.stdout + out.stderr


def stopped_line(log: str) -> re.Match:
  """The run's last line, which says where it stopped."""
  last = log.strip().splitlines()[-1]
  match = LINE.match(last)
  assert match, log
  return match


@pytest.mark.slow
def test_sigterm_in_each_stage_saves_there_and_the_reruns_give_the_uninterrupted_run(
  tiny_run, tmp_path
):
  reference, key = tiny_run[0], tiny_run[0] / "owner.key"
  workdir = tmp_path / "preempted"
  timings = {}

  start = time.time()  # Experts: after the first epoch of the first watermarked expert.
  status, log = run_cli(workdir, key, ("run_group", "kind == 'watermarked' and (s, e) == (0, 1)"))
  timings["experts"] = time.time() - start
  assert status == preemption.EXIT_CODE, log
  line = stopped_line(log)
  assert line.groups() == ("during", "experts", "at epoch 1 of 3 (watermarked experts 1-1)")
  steps = lambda group: sorted(p.name for p in group.glob("*") if p.name.isdigit())
  group = lambda g: steps(workdir / "resume/experts/watermarked" / g)
  assert group("0000") == ["1"]  # Saved where the signal came, not one epoch more.
  finished = (workdir / "trajectories/watermarked/0001").is_dir()
  assert group("0001") in (["1"], ["1", "2"]) or finished  # The other group ran on to a step.
  assert not (workdir / "run.lock").exists()

  start = time.time()  # Distillation: after the second iteration (of either set).
  status, log = run_cli(workdir, key, ("distill", "it == 1"))
  timings["distill"] = time.time() - start
  assert status == preemption.EXIT_CODE, log
  assert "watermarked expert 1 at epoch 1" in log  # It resumed the experts there.
  line = stopped_line(log)
  stopped = re.fullmatch(r"at iteration (\d) of 4 \((\w+)\)", line.group(3))
  assert line.group(2) == "distill" and stopped, line.group(0)
  saved = {d.name: resume.DistillStore(d).latest() for d in (workdir / "resume/distill").iterdir()}
  saved.pop("fingerprint")
  assert saved[stopped.group(2)] == int(stopped.group(1))  # Not 0: checkpoint_every is 50.
  assert set(saved) == {"distilled", "clean_distilled"} and all(1 <= s < 4 for s in saved.values())

  start = time.time()  # Evaluation: once the first set is evaluated.
  status, log = run_cli(workdir, key, ("stage_evaluate", "name == 'distilled'"))
  timings["evaluate"] = time.time() - start
  assert status == preemption.EXIT_CODE, log
  assert f"resuming at iteration {saved['distilled']}" in log
  assert stopped_line(log).groups() == ("during", "evaluate", "after convnet on distilled")
  done = json.loads((workdir / "resume/evaluate/done.json").read_text())["done"]
  assert done == [["convnet", "distilled"]]

  start = time.time()
  status, log = run_cli(workdir, key)
  timings["rest"] = time.time() - start
  print("seconds per run:", {k: round(v, 1) for k, v in timings.items()})
  assert status == 0, log
  assert "[evaluate] convnet resuming: distilled done" in log
  figures, arrays = _figures(workdir)
  expected_figures, expected_arrays = _figures(reference)
  assert figures == expected_figures
  chex.assert_trees_all_equal(arrays, expected_arrays)  # Bit for bit.


def test_the_handlers_only_record_the_first_signal_while_the_run_lasts():
  before = {sig: signal.getsignal(sig) for sig in preemption.SIGNALS}

  @preemption.handled
  def run():
    assert not preemption.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGINT)  # Ignored: no KeyboardInterrupt, still SIGTERM.
    assert preemption.should_stop() and preemption.received() == "SIGTERM"
    with preemption.stage("distill"), preemption.naming("distilled"):
      raise Preempted("at iteration 3 of 4")

  with pytest.raises(Preempted) as stopped:
    run()
  assert preemption.message(stopped.value) == (
    "stopped by SIGTERM during distill at iteration 3 of 4 (distilled); "
    "state saved: rerun the same command to resume"
  )
  assert {sig: signal.getsignal(sig) for sig in preemption.SIGNALS} == before
  assert preemption.received() is None and not preemption.should_stop()


def test_between_stages_names_the_stage_that_finished():
  assert not preemption.should_stop()
  preemption.between_stages("experts")  # No signal: nothing happens.
  stopped = Preempted("", "experts")
  stopped.signal = "SIGINT"
  assert preemption.message(stopped) == (
    "stopped by SIGINT after experts; state saved: rerun the same command to resume"
  )
