"""launch/'s scripts run as a user would, with DRY_RUN=1, under faked Slurm, TPU pod, Open MPI.

DRY_RUN=1 adds --dry_run to each `python -m ccdd_jax.main` the scripts start:
it prints the command line and the arguments that would reach
jax.distributed.initialize as one JSON line and exits before JAX starts.
`srun` and `gcloud` are small shell stubs on PATH that start the command once
per task or worker with the variables Slurm or a TPU VM sets. No test here
starts JAX.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import conftest
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.devices import hosts
from ccdd_jax.run import preemption

REPO = conftest.REPO
LAUNCHER_VARIABLES = ("SLURM_", "OMPI_", "TPU_", "CLOUD_TPU_", "MEGASCALE_", "JAX_COORDINATOR")
TIMEOUTS = {
  "initialization_timeout": hosts.JOIN_TIMEOUT,
  "heartbeat_timeout_seconds": hosts.HEARTBEAT_TIMEOUT,
  "shutdown_timeout_seconds": hosts.HEARTBEAT_TIMEOUT,
}

SRUN = r"""#!/usr/bin/env bash
# srun, faked: the command once per task, with the variables Slurm sets for each task.
ntasks=${SLURM_NTASKS:-1}
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in --ntasks=*) ntasks=${1#--ntasks=} ;; -n) ntasks=$2; shift ;; esac
  shift
done
for ((i = 0; i < ntasks; i++)); do
  SLURM_NTASKS=$ntasks SLURM_STEP_NUM_TASKS=$ntasks SLURM_PROCID=$i SLURM_LOCALID=0 \
    SLURM_STEP_NODELIST=$SLURM_JOB_NODELIST "$@" || exit $?
done
exit "${FAKE_SRUN_STATUS:-0}"  # What the step's tasks exit with, for the script to act on.
"""

SCONTROL = r"""#!/usr/bin/env bash
# scontrol, faked: its arguments, one call a line, in $HOME/scontrol.log.
echo "$*" >> "$HOME/scontrol.log"
"""

GCLOUD = r"""#!/usr/bin/env bash
# gcloud compute tpus tpu-vm ssh POD --zone Z --worker=W --command CMD, faked: CMD here, in
# $HOME, once per worker of a pod of $FAKE_TPU_HOSTS, as each TPU VM worker would run it.
worker="" command=""
while [[ $# -gt 0 ]]; do
  case $1 in --worker=*) worker=${1#--worker=} ;; --command) command=$2; shift ;; esac
  shift
done
IFS=, read -ra hosts <<< "$FAKE_TPU_HOSTS"
ids=$worker
if [[ $worker == all ]]; then ids=$(seq 0 $((${#hosts[@]} - 1))); fi
for i in $ids; do
  (cd "$HOME" && TPU_WORKER_HOSTNAMES=$FAKE_TPU_HOSTS TPU_WORKER_ID=$i bash -c "$command") || exit
done
"""


def stubs(tmp_path) -> pathlib.Path:
  """A directory with the `srun`, `scontrol` and `gcloud` stubs."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(parents=True)
  for name, text in (("srun", SRUN), ("gcloud", GCLOUD), ("scontrol", SCONTROL)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  return bin_dir


def clean_env(tmp_path, **variables) -> dict:
  """This environment without any launcher's variables, the stubs and this Python first on PATH."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_VARIABLES)}
  path = [str(stubs(tmp_path)), os.path.dirname(sys.executable), env.get("PATH", "")]
  env.update(PATH=os.pathsep.join(path), HOME=str(tmp_path), DRY_RUN="1", **variables)
  env.pop("PYTHONPATH", None)  # The scripts set it to the repository.
  return env


def dry_run(argv, env) -> list[dict]:
  """The JSON lines of a script or command run with DRY_RUN=1 (it must succeed)."""
  out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main_argv(workdir, *flags):
  return ["python", "-m", "ccdd_jax.main", "--workdir", str(workdir), *flags]


def initialize(address, n, i, **timeouts):
  """The arguments that must reach jax.distributed.initialize."""
  known = {"coordinator_address": address, "num_processes": n, "process_id": i}
  return {**known, "cluster_detection_method": "deactivate", **TIMEOUTS, **timeouts}


def test_slurm_script_starts_keygen_alone_then_one_process_per_task(tmp_path):
  workdir = tmp_path / "run"
  env = clean_env(
    tmp_path,
    SLURM_JOB_ID="4242",
    SLURM_NTASKS="2",
    SLURM_NNODES="2",
    SLURM_JOB_NODELIST="gpu[017-018]",
    SLURM_SUBMIT_DIR=str(REPO),
    WORKDIR=str(workdir),
    CONFIG="cifar10_ipc10",
    EXTRA="--config.experts.num_experts=16",
  )
  lines = dry_run(["bash", "launch/slurm_2nodes.sbatch"], env)
  common = ("--config", "cifar10_ipc10")
  extra = ("--config.experts.num_experts=16", "--dry_run")
  assert lines[0]["argv"] == main_argv(
    workdir, *common, "--stage=keygen", "--distributed=off", *extra
  )
  assert not lines[0]["distributed"]
  port = 4242 % 4096 + 61440  # JAX's rule for Slurm.
  for i, line in enumerate(lines[1:]):
    assert line["argv"] == main_argv(workdir, *common, "--distributed=on", *extra)
    assert line["source"] == "Slurm" and line["cpu_collectives"] == "gloo"
    assert line["initialize"] == initialize(f"gpu017:{port}", 2, i)
  assert len(lines) == 3
  assert not workdir.exists()  # Nothing written.

  workdir.mkdir()
  (workdir / "owner.key").write_text("made before\n")  # The key exists: no keygen step.
  env["JAX_COORDINATOR_PORT"] = "23456"
  lines = dry_run(["bash", "launch/slurm_2nodes.sbatch"], env)
  assert [line["initialize"]["coordinator_address"] for line in lines] == 2 * ["gpu017:23456"]
  assert [line["initialize"]["process_id"] for line in lines] == [0, 1]


def test_slurm_script_asks_for_the_signal_and_requeues_a_run_stopped_by_it(tmp_path):
  script = (REPO / "launch/slurm_2nodes.sbatch").read_text()
  assert re.search(r"^#SBATCH --signal=TERM@\d+$", script, re.M)  # Ahead of the time limit.
  assert "#SBATCH --requeue\n" in script and "#SBATCH --open-mode=append\n" in script
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "owner.key").write_text("made before\n")
  env = clean_env(
    tmp_path,
    SLURM_JOB_ID="4242",
    SLURM_NTASKS="2",
    SLURM_JOB_NODELIST="gpu[017-018]",
    SLURM_SUBMIT_DIR=str(REPO),
    WORKDIR=str(workdir),
  )
  requeued = tmp_path / "scontrol.log"
  for status, calls in ((preemption.EXIT_CODE, ["requeue 4242"]), (1, []), (0, [])):
    requeued.unlink(missing_ok=True)
    env["FAKE_SRUN_STATUS"] = str(status)
    argv = ["bash", "launch/slurm_2nodes.sbatch"]
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == status, out.stdout + out.stderr
    assert (requeued.read_text().splitlines() if requeued.exists() else []) == calls


def test_tpu_pod_script_makes_the_key_on_worker_0_then_runs_every_worker(tmp_path):
  workdir = tmp_path / "shared" / "run"
  env = clean_env(
    tmp_path,
    TPU="my-pod",
    ZONE="us-central2-b",
    WORKDIR=str(workdir),
    REMOTE_DIR=str(REPO),
    FAKE_TPU_HOSTS="t1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3",
    EXTRA="--heartbeat_timeout=30",
  )
  lines = dry_run(["bash", "launch/tpu_pod.sh"], env)
  flags = ("--config", "digits", "--heartbeat_timeout=30", "--dry_run")
  assert lines[0]["argv"] == main_argv(workdir, *flags, "--stage=keygen", "--distributed=off")
  assert not lines[0]["distributed"]
  waits = {"heartbeat_timeout_seconds": 30, "shutdown_timeout_seconds": 30}
  for i, line in enumerate(lines[1:]):
    assert line["argv"] == main_argv(workdir, *flags, "--distributed=on")
    assert line["source"] == "TPU pod"
    assert line["initialize"] == initialize("t1v-n-0:8482", 4, i, **waits)
  assert len(lines) == 5
  assert not workdir.exists()


def test_tpu_pod_without_worker_variables_leaves_detection_to_jax(tmp_path):
  # A Cloud TPU VM that exports no TPU_WORKER_*: JAX reads the TPU metadata (--distributed=on).
  argv = main_argv(tmp_path / "run", "--distributed=on", "--dry_run")
  (line,) = dry_run(argv, clean_env(tmp_path))
  assert line["source"] == "JAX's detection" and line["distributed"]
  assert line["initialize"] == TIMEOUTS


def test_multi_gpu_script_is_one_process(tmp_path):
  env = clean_env(tmp_path, WORKDIR=str(tmp_path / "run"), NUM_DEVICES="4", DATA="/data/c10")
  (line,) = dry_run(["bash", "launch/multi_gpu.sh"], env)
  flags = ("--config", "digits", "--config.data.root=/data/c10", "--num_devices=4")
  assert line["argv"] == main_argv(tmp_path / "run", *flags, "--distributed=off", "--dry_run")
  assert line["distributed"] is False and line["initialize"] is None
  assert not (tmp_path / "run").exists()


def test_open_mpi_ranks_under_mpirun(tmp_path):
  # What `mpirun -np 2 python -m ccdd_jax.main ...` (launch/README.md) gives each rank.
  uri = "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"
  port = 1531576320 // 4096 % 4096 + 61440  # JAX's rule for Open MPI.
  for rank in range(2):
    env = clean_env(
      tmp_path / str(rank),
      OMPI_COMM_WORLD_SIZE="2",
      OMPI_COMM_WORLD_RANK=str(rank),
      OMPI_COMM_WORLD_LOCAL_RANK=str(rank),
      OMPI_MCA_orte_hnp_uri=uri,
    )
    (line,) = dry_run(main_argv(tmp_path / "run", "--dry_run"), env)  # --distributed=auto.
    assert line["source"] == "Open MPI"
    assert line["initialize"] == initialize(f"10.96.0.1:{port}", 2, rank)


def test_flags_win_over_the_launcher(tmp_path):
  env = clean_env(tmp_path, SLURM_NTASKS="4", SLURM_PROCID="3", SLURM_JOB_NODELIST="n1")
  flags = ("--coordinator_address=10.0.0.1:1234", "--process_id=1", "--join_timeout=20")
  (line,) = dry_run(main_argv(tmp_path / "run", *flags, "--dry_run"), env)
  assert line["source"] == "flags and Slurm"
  assert line["initialize"] == initialize("10.0.0.1:1234", 4, 1, initialization_timeout=20)


@pytest.mark.parametrize(
  "nodelist, first",
  [
    ("node001", "node001"),
    ("node001,host2", "node001"),
    ("node[001-015],host2", "node001"),
    ("node[007,009-015]", "node007"),
    ("gpu-[03-04]-ib,cpu1", "gpu-03-ib"),
  ],
)
def test_first_slurm_host(nodelist, first):
  assert hosts.first_slurm_host(nodelist) == first


def test_coordinators_follow_jax_rules(monkeypatch):
  from jax._src.clusters import ompi_cluster  # pylint: disable=g-import-not-at-top
  from jax._src.clusters import slurm_cluster  # pylint: disable=g-import-not-at-top

  environ = {
    "SLURM_JOB_ID": "987654",
    "SLURM_STEP_NODELIST": "a[12-13],b4",
    "SLURM_NTASKS": "3",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "OMPI_MCA_orte_hnp_uri": "1314521088.0;tcp://10.1.2.3,10.4.5.6:43370",
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_RANK": "0",
  }
  for name, value in environ.items():
    monkeypatch.setenv(name, value)
  monkeypatch.delenv("JAX_COORDINATOR_PORT", raising=False)
  slurm = {k: v for k, v in environ.items() if not k.startswith("OMPI")}
  ours = hosts.resolve("auto", environ=slurm)
  assert ours.coordinator_address == slurm_cluster.SlurmCluster.get_coordinator_address(None, None)
  assert (ours.num_processes, ours.process_id) == (3, 2)
  ompi = {k: v for k, v in environ.items() if k.startswith("OMPI")}
  ours = hosts.resolve("auto", environ=ompi)
  assert ours.coordinator_address == ompi_cluster.OmpiCluster.get_coordinator_address(None, None)


def test_settings_that_cannot_make_a_run():
  with pytest.raises(CCDDError, match="use auto, on or off"):
    hosts.resolve("yes", environ={})
  assert hosts.resolve("auto", environ={}) is None
  assert hosts.resolve("auto", environ={"SLURM_NTASKS": "1"}) is None
  assert hosts.resolve("on", num_processes=1, process_id=0, coordinator_address="h:1") is None
  with pytest.raises(CCDDError, match=r"Open MPI\) needs --coordinator_address"):
    hosts.resolve("auto", environ={"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"})
  with pytest.raises(CCDDError, match="SLURM_PROCID='x' is not an integer"):
    hosts.resolve("auto", environ={"SLURM_NTASKS": "2", "SLURM_PROCID": "x"})
  with pytest.raises(CCDDError, match="--join_timeout and --heartbeat_timeout are seconds"):
    hosts.resolve("on", "h:1", 2, 0, join_timeout=0, environ={})
