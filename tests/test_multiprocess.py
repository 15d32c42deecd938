"""Two processes on this machine, joined by jax.distributed over gloo, against one process.

Each process has one CPU device; `python -m ccdd_jax.main --coordinator_address
localhost:PORT --num_processes 2 --process_id I` joins them into one mesh of two
devices (launch/README.md, "Try it on one machine"). Checked: the experts, the
distilled sets and the evaluation equal a one-process run's to float32
rounding (TOL); only process 0 writes (an audit hook logs every write under
the workdir, in each process); a killed process stops the other in one line
within the heartbeat timeout, and a rerun resumes; --fresh is coordinated;
refusals (a coordinator that cannot be reached, process counts that disagree,
a missing key, devices) are one line on each process, exit 1, nothing written.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import conftest
import numpy as np
import pytest

from ccdd_jax.devices import hosts
from ccdd_jax.devices import supervisor
from ccdd_jax.method import watermark

REPO = conftest.REPO
# Measured: the distilled images differ by at most 2.4e-7 (2 processes against 1; eq. 10's
# losses by 6e-8), every accuracy and p-value in report.json is equal.
TOL = dict(rtol=1e-5, atol=1e-6)
HEARTBEAT = 10  # --heartbeat_timeout of these runs: a dead process is noticed within it.
JOIN = 5  # --join_timeout of the refusals.
# The tiny digits run: the "appended" embedding (clean experts, one distillation), flips as
# the only augmentation, a one-layer ConvNet; seconds of compilation per stage.
CONFIG = [
  "--config=digits",
  *(
    f"--config.{o}"
    for o in (
      "experts.num_experts=2",
      "experts.epochs=2",
      "experts.fp_normal_last_epochs=1",
      "distill.iterations=3",
      "distill.syn_steps=2",
      "distill.max_start_epoch=1",
      "distill.expert_epochs=1",
      "distill.ipc=1",
      "distill.checkpoint_every=1",
      "eval.num_seeds=2",
      "eval.epochs=2",
      "eval.real_epochs=1",
      "model.width=4",
      "model.depth=1",
      "watermark.queries_per_pattern=10",
      "dsa.strategy=flip",
    )
  ),
]
# `python -c AUDIT ROOT LOG ARGS...` is `python -m ccdd_jax.main ARGS...` that logs to LOG each
# write, rename, removal or new directory under ROOT (the supervisor's child reruns it too).
AUDIT = r"""
import os, runpy, sys
root = os.path.realpath(sys.argv.pop(1))
log = os.open(sys.argv.pop(1), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate",
          "os.chmod", "os.utime", "os.link", "os.symlink", "shutil.move", "shutil.copyfile")
def hook(event, args):
  if event == "open":
    path, mode, flags = args
    writes = bool(mode and set(mode) & set("wax+")) or bool((flags or 0) & WRITES)
  elif event in EVENTS:
    path, writes = args[0], True
  else:
    return
  if writes and isinstance(path, (str, bytes, os.PathLike)):
    if os.path.realpath(os.fsdecode(path)).startswith(root):
      os.write(log, f"{os.getpid()} {event} {os.fsdecode(path)}\n".encode())
sys.addaudithook(hook)
runpy.run_module("ccdd_jax.main", run_name="__main__", alter_sys=True)
"""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def env() -> dict:
  out = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  return {k: v for k, v in out.items() if not k.startswith(("SLURM_", "OMPI_", "TPU_"))}


def start(workdir, log, *flags, audit=None):
  """`python -m ccdd_jax.main` (under the audit hook when `audit` names its log) in the
  background, its output in `log`.out / .err."""
  runner = ["-c", AUDIT, str(workdir), str(audit)] if audit else ["-m", "ccdd_jax.main"]
  argv = [sys.executable, *runner, f"--workdir={workdir}", *CONFIG, *flags]
  out, err = (open(f"{log}.{s}", "w+") for s in ("out", "err"))
  return subprocess.Popen(argv, cwd=REPO, env=env(), stdout=out, stderr=err), err


def start_pair(workdir, tmp, name, *flags, audit=True, per_process=None):
  """Processes 0 and 1 of one run; `per_process[i]` adds flags to process i."""
  port, procs = free_port(), []
  for i in range(2):
    where = f"--coordinator_address=localhost:{port}"
    ids = [where, "--num_processes=2", f"--process_id={i}", f"--heartbeat_timeout={HEARTBEAT}"]
    extra = (per_process or {}).get(i, [])
    log = tmp / f"{name}{i}"
    procs.append(
      start(workdir, log, *ids, *flags, *extra, audit=tmp / f"audit{i}" if audit else None)
    )
  return procs


def finish(proc, timeout=300):
  """(exit status, stderr lines) of a started process."""
  p, err = proc
  code = p.wait(timeout=timeout)
  err.seek(0)
  return code, err.read().splitlines()


def error_lines(lines):
  return [line for line in lines if line.startswith("error: ")]


def one_line(proc, timeout=300):
  """The one `error: ...` line of a process that failed (exit 1), last on its stderr."""
  code, lines = finish(proc, timeout)
  assert code == 1, "\n".join(lines[-30:])
  assert len(error_lines(lines)) == 1 and lines[-1] == error_lines(lines)[0], "\n".join(lines)
  return lines[-1]


def results(workdir):
  report = json.loads((workdir / "report.json").read_text())
  figures = {
    name: {k: report[name][k] for k in ("acc", "acc_w", "p_values", "verified")}
    for name in ("distilled", "clean_distilled", "real")
  }
  figures["experts"] = report["experts"]["clean"]
  with np.load(workdir / "distilled.npz") as f:
    return figures, {k: f[k] for k in f.files}


def files(workdir):
  """The workdir's files, without the names Orbax and TensorBoard make unique per write."""
  return sorted(
    str(p.relative_to(workdir))
    for p in workdir.rglob("*")
    if p.is_file() and "/d/" not in str(p) and "tfevents" not in p.name
  )


def under_way(workdir):
  """Whether the experts stage saved an epoch (its resume state is on disk)."""
  return any(p.name.isdigit() for p in workdir.glob("resume/experts/*/*/*"))


@pytest.mark.slow
def test_two_processes_give_one_process_results_and_only_process_0_writes(tmp_path):
  key = tmp_path / "owner.key"
  watermark.write_key_file(key, conftest.TINY_KEY)
  one, two = tmp_path / "one", tmp_path / "two"
  for workdir in (one, two):
    workdir.mkdir()
    (workdir / "owner.key").write_bytes(key.read_bytes())
  began = time.monotonic()
  reference = start(one, tmp_path / "one", "--distributed=off")
  pair = start_pair(two, tmp_path, "killed")
  while not under_way(two) and pair[1][0].poll() is None:
    time.sleep(0.05)
  pair[1][0].send_signal(signal.SIGKILL)  # Process 1's supervisor; its child dies with it.
  killed_at = time.monotonic()
  line = one_line(pair[0], timeout=HEARTBEAT + 60)
  assert time.monotonic() - killed_at < HEARTBEAT + 10
  assert line.startswith("error: process 0 of 2: another process of this run stopped")
  assert pair[1][0].wait() == -signal.SIGKILL

  print(f"killed process 1 at {time.monotonic() - began:.0f} s; process 0 stopped")
  again = start_pair(two, tmp_path, "resumed")  # Resumes the experts.
  for proc in again:
    code, lines = finish(proc)
    assert code == 0, "\n".join(lines[-30:])
  assert not error_lines(lines)
  code, lines = finish(reference)
  assert code == 0, "\n".join(lines[-30:])
  print(f"resumed run and reference done at {time.monotonic() - began:.0f} s")
  figures, arrays = results(two)
  expected_figures, expected_arrays = results(one)
  assert figures == expected_figures
  assert arrays.keys() == expected_arrays.keys()
  for name, array in arrays.items():
    np.testing.assert_allclose(array, expected_arrays[name], err_msg=name, **TOL)
  assert files(two) == [f for f in files(one) if f != "run.lock"]
  assert (tmp_path / "audit1").read_text() == ""  # Process 1 wrote nothing under two/.
  assert "report.json" in (tmp_path / "audit0").read_text()  # The hook sees process 0's writes.

  fresh = start_pair(two, tmp_path, "fresh", "--fresh", "--stage=queries")
  for proc in fresh:
    assert finish(proc)[0] == 0
  assert (two / "queries.npz").is_file() and (two / "owner.key").is_file()
  assert not [f for f in ("trajectories", "models", "resume", "report.json") if (two / f).exists()]
  assert (tmp_path / "audit1").read_text() == ""  # Process 0 alone removed the outputs.


@pytest.mark.slow
def test_refusals_are_one_line_on_each_process_and_write_nothing(tmp_path):
  key = tmp_path / "owner.key"
  watermark.write_key_file(key, conftest.TINY_KEY)
  runs, began = {}, time.monotonic()
  for case in ("unreachable", "three", "counts", "key", "devices", "alone"):
    (tmp_path / case).mkdir()
  address, waits = f"localhost:{free_port()}", [f"--join_timeout={JOIN}", "--heartbeat_timeout=10"]
  alone = ["--num_processes=2", "--process_id=1", f"--coordinator_address={address}", *waits]
  runs["unreachable"] = [start(tmp_path / "unreachable", tmp_path / "unreachable1", *alone)]
  three = [f"--join_timeout={JOIN}", "--num_processes=3"]  # Two of three processes start.
  runs["three"] = start_pair(tmp_path / "three", tmp_path, "three", *three, audit=False)
  disagree = {1: ["--num_processes=3"]}  # Process 1 says 3; process 0 (the coordinator) 2.
  runs["counts"] = start_pair(tmp_path / "counts", tmp_path, "counts", per_process=disagree)
  missing = {i: [f"--key_file={tmp_path / ('owner.key', 'none.key')[i]}"] for i in range(2)}
  runs["key"] = start_pair(tmp_path / "key", tmp_path, "key", per_process=missing, audit=False)
  one_device = ["--num_devices=1", f"--key_file={key}"]  # Of 2 devices in the mesh.
  runs["devices"] = start_pair(tmp_path / "devices", tmp_path, "devices", *one_device, audit=False)
  other = tmp_path / "other.commitment"  # Process 0 alone refuses its key: the others follow.
  other.write_text(watermark.key_commitment(bytes(32)) + "\n")
  alone = {0: [f"--commitment={other}"]}
  runs["alone"] = start_pair(
    tmp_path / "alone", tmp_path, "alone", f"--key_file={key}", per_process=alone
  )
  lines = {case: [one_line(proc, timeout=120) for proc in procs] for case, procs in runs.items()}
  print(f"refusals done in {time.monotonic() - began:.0f} s")
  assert lines["unreachable"] == [
    f"error: process 1 of 2 could not join the run at {address} within {JOIN} s: process 0 (the "
    "coordinator) cannot be reached there, or not every process started: start 2 processes "
    "(--process_id 0 to 1), each with the same --coordinator_address and --num_processes"
  ]
  assert lines["three"][0].startswith("error: process 0 of 3: not every process joined the run")
  assert lines["three"][1].startswith("error: process 1 of 3 could not join the run")
  assert lines["counts"] == 2 * [
    "error: the 2 processes were started with different process counts (process 1 differs from "
    "process 0): start every process with the same flags"
  ]
  how = "make it first with one process (--stage=keygen --distributed=off), launch/README.md"
  assert lines["key"] == [
    "error: process 1 of 2 has no key file (its --key_file or <workdir>/owner.key): every "
    f"process reads the same key; {how}",
    f"error: no key file at {tmp_path / 'none.key'}: a run of 2 processes reads one key; {how}",
  ]
  assert lines["devices"] == 2 * [
    "error: num_devices = 1: a multi-process run uses all its devices (0)"
  ]
  assert lines["alone"][0].startswith(f"error: the key in {key} (fingerprint ")
  assert lines["alone"][1].startswith("error: process 1 of 2: another process of this run stopped")
  for case in runs:
    assert not any((tmp_path / case).iterdir()), case  # Nothing written.


@pytest.mark.slow
def test_a_dead_coordinator_stops_the_other_process_in_one_line(tmp_path):
  # Process 0 runs JAX's coordination service: its death ends process 1 from C++ (the
  # supervisor's line) or in a collective (the run's own line), at once either way.
  workdir = tmp_path / "run"
  workdir.mkdir()
  watermark.write_key_file(workdir / "owner.key", conftest.TINY_KEY)
  pair = start_pair(workdir, tmp_path, "coordinator", audit=False)
  while not (workdir / "manifest.json").exists() and pair[0][0].poll() is None:
    time.sleep(0.05)
  pair[0][0].send_signal(signal.SIGKILL)
  killed_at = time.monotonic()
  line = one_line(pair[1], timeout=HEARTBEAT + 60)
  assert time.monotonic() - killed_at < HEARTBEAT + 10
  assert line.startswith("error: process 1 of 2: another process of this run stopped"), line


def test_flags_that_cannot_make_a_run_are_one_line_before_jax_starts(tmp_path):
  cases = {
    ("--num_processes=2", "--process_id=2", "--coordinator_address=localhost:1"): (
      "error: --process_id = 2 with 2 processes: use 0 to 1 (flags)"
    ),
    ("--num_processes=2", "--process_id=0"): (
      "error: a multi-process run (flags) needs --coordinator_address: pass it (launch/README.md)"
    ),
    ("--coordinator_address=nohost", "--num_processes=2", "--process_id=0"): (
      "error: --coordinator_address = 'nohost': use HOST:PORT, e.g. localhost:12355"
    ),
    ("--distributed=off", "--num_processes=2"): (
      "error: --distributed=off with --num_processes: drop them, or use auto"
    ),
  }
  for flags, expected in cases.items():
    argv = [sys.executable, "-m", "ccdd_jax.main", f"--workdir={tmp_path / 'w'}", *flags]
    out = subprocess.run(argv, cwd=REPO, env=env(), capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr.strip()) == (1, expected)
    assert not (tmp_path / "w").exists()


def test_supervisor_turns_jax_fatal_errors_into_one_line():
  settings = hosts.Settings("node1:1234", 2, 1, "flags", join_timeout=30, heartbeat_timeout=20)
  out = io.BytesIO()
  relay = supervisor.Relay(out)
  fatal = (
    b"[distill] set:  33%|###  | 1/3\r[distill] set:  67%|######  | 2/3"
    b"\rE1205 18:24:02.605999   21180 coordination_service_agent.cc:289] Polled an error\n"
    b"F1205 18:24:02.606 21180 client.h:80] Terminating process because the JAX distributed "
    b"service detected fatal errors. This most likely indicates that another task died. "
    b"absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):"
    b"\n0\nThe tasks have crashed.\n*** Check failure stack trace: ***\n    @ 0x7f3d SendToLog()\n"
  )
  for i in range(0, len(fatal), 7):  # In chunks that cut lines anywhere.
    relay.feed(fatal[i : i + 7])
  relay.close()
  assert out.getvalue().endswith(b"Polled an error\n") and b"Terminating" not in out.getvalue()
  assert not relay.child_error
  assert supervisor.message(settings, relay.fatal) == (
    "process 1 of 2: another process of this run stopped or cannot be reached (UNAVAILABLE: The "
    "following tasks are unhealthy (stopped sending heartbeats):); this one stops too "
    "(heartbeat timeout 20 s, launch/README.md)"
  )
  joining = [b"F1205 client.h:80] Terminating process because the JAX distributed service "]
  joining += [b"detected fatal errors. absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded\n"]
  joining += [b"RPC: /xla.coordination.CoordinationService/RegisterTask\n"]
  assert supervisor.message(settings, joining).startswith(
    "process 1 of 2 could not join the run at node1:1234 within 30 s"
  )
  for then, shown in ((b"", b"E1205 shutting down\n"), (fatal, b"")):
    out = io.BytesIO()
    relay = supervisor.Relay(out)
    relay.feed(b"[experts] ...\nerror: workdir w is in use\nE1205 shutting down\n" + then)
    relay.close()
    assert relay.child_error
    assert out.getvalue() == b"[experts] ...\nerror: workdir w is in use\n" + shown
