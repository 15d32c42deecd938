"""One run per workdir (run/lock.py): refusal naming the holder, stale locks, racing starters."""

import hashlib
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time

import conftest
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.run import lock
from ccdd_jax.run import pipeline

REPO = conftest.REPO


def _snapshot(root: pathlib.Path) -> dict:
  """Every file under `root`: its bytes' digest and mtime."""
  return {
    str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    for p in sorted(root.rglob("*"))
    if p.is_file()
  }


def _dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _plant(workdir: pathlib.Path, **changes) -> dict:
  """Writes a lock record of this process with `changes`, as another run would have left it."""
  record = {**lock.whoami("experts"), **changes}
  (workdir / lock.FILE).write_text(json.dumps(record) + "\n")
  return record


def test_a_second_acquisition_refuses_in_one_line_naming_the_holder(tmp_path):
  first = lock.acquire(tmp_path, "all")
  try:
    held = (tmp_path / lock.FILE).read_bytes()
    with pytest.raises(CCDDError) as refused:
      lock.acquire(tmp_path, "distill")
    message = str(refused.value)
    print(message)
    assert "\n" not in message
    assert re.search(
      rf"workdir {re.escape(str(tmp_path))} is in use by pid {os.getpid()} on host "
      rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC "
      r"\(--stage=all, last heartbeat \d+ s ago\)",
      message,
    )
    assert (tmp_path / lock.FILE).read_bytes() == held  # The refused one wrote nothing.
    assert sorted(p.name for p in tmp_path.iterdir()) == [lock.FILE]
  finally:
    first.release()
  assert not (tmp_path / lock.FILE).exists()
  lock.acquire(tmp_path).release()  # Free again.


def test_a_busy_workdir_is_refused_before_any_write_even_with_fresh(tmp_path):
  """A second pipeline.run (--fresh at that) leaves the first run's outputs as they were."""
  (tmp_path / "resume" / "distill").mkdir(parents=True)
  (tmp_path / "resume" / "distill" / "fingerprint").write_text("abc\n")
  (tmp_path / "manifest.json").write_text('{"format": 1, "fields": {}}\n')
  (tmp_path / "distilled.npz").write_bytes(b"the first run's set")
  first = lock.acquire(tmp_path, "all")
  try:
    before = _snapshot(tmp_path)
    with pytest.raises(CCDDError, match=f"is in use by pid {os.getpid()} "):
      pipeline.run(conftest.tiny_config(), str(tmp_path), "all", fresh=True)
    assert _snapshot(tmp_path) == before
  finally:
    first.release()


def test_the_lock_is_released_when_a_run_fails(tmp_path):
  with pytest.raises(CCDDError, match="no key file"):
    pipeline.run(conftest.tiny_config(), str(tmp_path), "experts")
  assert not (tmp_path / lock.FILE).exists()
  with pytest.raises(ValueError, match="released_at_return"):
    lock.hold(tmp_path)


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capfd):
  pid = _dead_pid()
  _plant(tmp_path, pid=pid, start="1")
  taken = lock.acquire(tmp_path)
  try:
    assert json.loads((tmp_path / lock.FILE).read_text())["pid"] == os.getpid()
    err = capfd.readouterr().err
    assert f"took over the stale lock {tmp_path / lock.FILE} of pid {pid} on host" in err
    assert "(that process is gone)" in err
    assert not (tmp_path / (lock.FILE + ".takeover")).exists()
  finally:
    taken.release()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path, capfd):
  """The lock's pid is alive (ours) but started at another time: another process now."""
  _plant(tmp_path, start="1")
  lock.acquire(tmp_path).release()
  assert f"(pid {os.getpid()} is another process now)" in capfd.readouterr().err


def test_another_hosts_lock_is_taken_over_only_after_its_heartbeat_stops(tmp_path, capfd):
  _plant(tmp_path, host="node-elsewhere", pid=4242)
  with pytest.raises(CCDDError, match="in use by pid 4242 on host node-elsewhere"):
    lock.acquire(tmp_path)
  silent = time.time() - lock.STALE_AFTER_SECONDS - 60
  os.utime(tmp_path / lock.FILE, (silent, silent))
  lock.acquire(tmp_path).release()
  assert re.search(
    r"of pid 4242 on host node-elsewhere \(no heartbeat for 18\d s\)", capfd.readouterr().err
  )


def test_the_holder_touches_its_lock(tmp_path):
  held = lock.acquire(tmp_path, heartbeat=0.05)
  try:
    old = time.time() - 1000
    os.utime(tmp_path / lock.FILE, (old, old))
    time.sleep(0.5)
    assert (tmp_path / lock.FILE).stat().st_mtime > old + 900
  finally:
    held.release()


@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_threads_exactly_one_wins(tmp_path, stale):
  if stale:
    _plant(tmp_path, pid=_dead_pid(), start="1")
  start, results = threading.Barrier(8), []

  def race():
    start.wait()
    try:
      results.append(lock.acquire(tmp_path))
    except CCDDError as e:
      results.append(e)

  threads = [threading.Thread(target=race) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  winners = [r for r in results if isinstance(r, lock.Lock)]
  assert len(winners) == 1 and len(results) == 8
  winners[0].release()
  assert sorted(p.name for p in tmp_path.iterdir()) == []


RACER = """
import os, pathlib, sys, time
from ccdd_jax import CCDDError
from ccdd_jax.run import lock
workdir, marks, count = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
def wait_for(what):  # A barrier: every racer has got this far.
  (marks / f"{what}.{os.getpid()}").touch()
  while len(list(marks.glob(what + ".*"))) < count:
    time.sleep(0.001)
wait_for("ready")  # JAX imported: now they all race at once.
try:
  held = lock.acquire(workdir)
except CCDDError as e:
  print("refused", e)
  wait_for("tried")
else:
  print("won")
  wait_for("tried")  # Held until every racer has tried.
  held.release()
"""


@pytest.mark.slow
@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale"])
def test_racing_processes_exactly_one_wins(tmp_path, stale):
  """Four processes race at one instant for a free workdir, or for one a dead run left locked."""
  workdir, marks, count = tmp_path / "workdir", tmp_path / "marks", 4
  workdir.mkdir()
  marks.mkdir()
  if stale:
    _plant(workdir, pid=_dead_pid(), start="1")
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  argv = [sys.executable, "-c", RACER, str(workdir), str(marks), str(count)]
  procs = [
    subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(count)
  ]
  outs = [p.communicate(timeout=120) for p in procs]
  print(outs)
  assert all(p.returncode == 0 for p in procs)
  assert [out for out, _ in outs].count("won\n") == 1
  assert sum(out.startswith("refused") for out, _ in outs) == count - 1
  assert sum("took over the stale lock" in err for _, err in outs) == int(stale)
  assert sorted(p.name for p in workdir.iterdir()) == []


@pytest.mark.slow
def test_a_second_cli_run_on_a_busy_workdir_is_refused_and_the_first_finishes(tiny_run, tmp_path):
  """Two `python -m ccdd_jax.main` on one workdir: the second exits 1 with one line naming the
  first, which finishes with the uninterrupted run's results (it used to die in Orbax)."""
  import test_resume  # pylint: disable=g-import-not-at-top

  reference, key = tiny_run[0], tiny_run[0] / "owner.key"
  workdir = tmp_path / "busy"
  first, first_log = test_resume.cli(workdir, key)
  while not (workdir / lock.FILE).exists() and first.poll() is None:
    time.sleep(0.02)
  second, second_log = test_resume.cli(workdir, key)
  assert second.wait(timeout=300) == 1
  second_log.seek(0)
  lines = second_log.read().strip().splitlines()
  print(lines)
  assert first.poll() is None, "the first run ended before the second was refused"
  assert re.fullmatch(
    rf"error: workdir {re.escape(str(workdir))} is in use by pid {first.pid} on host "
    rf"{re.escape(socket.gethostname())} since .* UTC \(--stage=all, .*\): one run per workdir; "
    r"wait for it, or remove .*run\.lock if that run is gone",
    lines[-1],
  )
  assert first.wait(timeout=600) == 0, first_log.seek(0) or first_log.read()
  assert test_resume._figures(workdir)[0] == test_resume._figures(reference)[0]
  assert not (workdir / lock.FILE).exists()
