r"""Runs the CCDD pipeline: python -m ccdd_jax.main --workdir runs/demo [--stage ...].

--config configs/<name>.py   a get_config() file, or a shipped config's name
                             (default: digits); override any field as
                             --config.distill.ipc=1
--stage  one stage of ccdd_jax/run/stages.py's table (keygen, queries, ...), or
         all (default): every stage the table runs by default, keygen to verify
--key_file  the owner's key (default <workdir>/owner.key)
--predictions FILE  with --stage=verify: a black-box suspect's classes for
                    queries.npz (.npy, or one integer per line)
--commitment FILE   refuse a key that does not match this published commitment
--fresh  start over: remove the workdir's outputs (not the key) first; without
         it a rerun resumes where the last run stopped, and a workdir made
         with another config is refused (naming the differing fields)
--num_devices N     spread the stages over N devices (default: config.num_devices,
                    0 = every device of every process); see devices/sharding.py
--distributed auto|on|off  jax.distributed.initialize() before any other JAX
                    work: auto = when launched by Slurm, Open MPI or on a TPU
                    pod, or given the flags below (launch/README.md); only
                    process 0 writes files
--coordinator_address HOST:PORT --num_processes N --process_id I
                    a multi-process run by hand (e.g. two processes on one
                    machine); they win over what a launcher says
--join_timeout S (300)  every process must join within S seconds
--heartbeat_timeout S (60)  a process silent for S seconds is dead: the others
                    stop with one line (devices/supervisor.py, devices/hosts.py)
--dry_run  print the command line and what would reach
           jax.distributed.initialize as one JSON line, and exit (no JAX)

Exit status: 0 done; 1 an error (one `error: ...` line); run/preemption.py's
EXIT_CODE: stopped by SIGTERM or SIGINT with the state saved (one line says
where; the same command resumes).
"""

import os
import sys
import traceback

from absl import app
from absl import flags

from ccdd_jax import CCDDError
from ccdd_jax import Preempted
from ccdd_jax.config import loader as config_loader
from ccdd_jax.run import stages


def one_line_exit(error: Exception, before_exit=None) -> None:
  """Prints an error as one line, calls `before_exit`, exits 1 (no traceback: users' mistakes)."""
  message = " ".join(str(error).replace("\\n", " ").split())
  close_progress_bars()
  print(f"error: {message}", file=sys.stderr, flush=True)
  if before_exit is not None:
    before_exit()
  sys.exit(1)


def close_progress_bars() -> None:
  """Clears unfinished progress bars, so that what follows starts its own line."""
  bars = list(getattr(getattr(sys.modules.get("tqdm.std"), "tqdm", None), "_instances", ()))
  for bar in bars:
    bar.close()
  if len(bars) > 1:  # Closing stacked bars ends with a cursor-up escape: start a fresh line.
    print(file=sys.stderr, flush=True)


def config_error_exit(argv: list[str], error: Exception) -> None:
  """Exits with the clearest one-line reason a config flag or override failed."""
  path, overrides = config_loader.DEFAULT_CONFIG, []
  for arg in argv:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg.startswith("--config.") and "=" in arg:
      overrides.append(arg[len("--config.") :])
  try:
    config_loader.load(path, overrides)
  except CCDDError as reason:
    one_line_exit(reason)
  one_line_exit(error)


def _config_argv(argv: list[str]) -> list[str]:
  """argv with `--config NAME` resolved to a shipped config's file where NAME is not a file."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      out[i] = "--config=" + config_loader.config_path(arg.split("=", 1)[1])
    elif arg == "--config" and i + 1 < len(out):
      out[i + 1] = config_loader.config_path(out[i + 1])
  return out


try:  # Registering the flag already reads --config.* overrides from sys.argv.
  sys.argv = _config_argv(sys.argv)
  _CONFIG = config_loader.define_config_flag(
    default=config_loader.config_path(config_loader.DEFAULT_CONFIG)
  )
except Exception as e:  # Overrides and config paths raise many types.
  config_error_exit(sys.argv, e)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for keys, trajectories, results.")
_STAGE = flags.DEFINE_enum(
  "stage",
  "all",
  [*stages.NAMES, "all"],
  f"Which stage to run; all = {', '.join(stages.IN_ALL)}.",
)
_KEY_FILE = flags.DEFINE_string("key_file", None, "Key file (default <workdir>/owner.key).")
_PREDICTIONS = flags.DEFINE_string(
  "predictions",
  None,
  "With --stage=verify: a black-box suspect's predicted classes for <workdir>/queries.npz, "
  "in its order (.npy, or a text file with one integer per line).",
)
_FRESH = flags.DEFINE_bool(
  "fresh", False, "Remove the workdir's outputs (not the key) and start over; default: resume."
)
_NUM_DEVICES = flags.DEFINE_integer(
  "num_devices",
  None,
  "Devices to spread the stages over (sets config.num_devices; 0 = all devices).",
)
_DISTRIBUTED = flags.DEFINE_string(
  "distributed",
  "auto",
  "auto | on | off: call jax.distributed.initialize() (auto: under Slurm, Open MPI, TPU pods).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "HOST:PORT of process 0 in a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to N - 1.")
_JOIN_TIMEOUT = flags.DEFINE_integer(
  "join_timeout", None, "Seconds every process has to join a multi-process run (300)."
)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
  "heartbeat_timeout", None, "Seconds after which a silent process is dead (60)."
)
_DRY_RUN = flags.DEFINE_bool(
  "dry_run", False, "Print the command line and jax.distributed's arguments as JSON; exit."
)
_COMMITMENT = flags.DEFINE_string(
  "commitment", None, "A published key commitment (owner.commitment); other keys are refused."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from ccdd_jax.devices import hosts  # No JAX in the dry run and the supervisor.
  from ccdd_jax.devices import supervisor

  try:
    ids = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    waits = (_JOIN_TIMEOUT.value, _HEARTBEAT_TIMEOUT.value)
    settings = hosts.resolve(_DISTRIBUTED.value, *ids, *waits)
  except CCDDError as e:
    one_line_exit(e)
  if _DRY_RUN.value:
    print(hosts.dry_run_line(settings))
  elif settings is not None and not supervisor.supervised():
    sys.exit(supervisor.run(settings))  # This command as its child: JAX's fatal errors in one line.
  else:
    run_stages(settings)


def run_stages(settings) -> None:
  """jax.distributed (for `settings`), then the stage(s); prints the result."""
  from ccdd_jax.devices import sharding  # Imported late: flags first, then jax.

  try:
    sharding.initialize_distributed(settings)  # Before any other JAX work.
    from ccdd_jax.run import pipeline

    config = config_loader.materialize(_CONFIG, flags.FLAGS["config"].serialize().split("=", 1)[-1])
    if _NUM_DEVICES.value is not None:
      config.num_devices = _NUM_DEVICES.value
    report = pipeline.run(
      config,
      _WORKDIR.value,
      _STAGE.value,
      _KEY_FILE.value,
      predictions=_PREDICTIONS.value,
      commitment=_COMMITMENT.value,
      fresh=_FRESH.value,
    )
  except CCDDError as e:
    one_line_exit(e, sharding.shutdown_distributed)
  except Preempted as stopped:  # Not an error: the state is saved, the same command resumes.
    from ccdd_jax.run import preemption

    close_progress_bars()
    print(preemption.message(stopped), file=sys.stderr, flush=True)
    sharding.shutdown_distributed()
    sys.exit(preemption.EXIT_CODE)
  except Exception as e:  # In a multi-process run: one line when another process is gone.
    if not sharding.multi_process():
      raise
    close_progress_bars()
    if why := sharding.peer_failure(e):
      print(f"error: {why}", file=sys.stderr)
    else:
      traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # Not waiting at the shutdown barrier for a process that is gone.
  print_result(report, sharding.is_writer())
  sharding.shutdown_distributed()


def print_result(report: dict, wrote: bool = True) -> None:
  """What a finished stage prints: the verdict, the queries written, or the report
  (the files "wrote" names only where this process wrote them: process 0)."""
  from ccdd_jax.method import verify
  from ccdd_jax.run import blackbox
  from ccdd_jax.run import reporting

  if _PREDICTIONS.value:
    print(verify.verdict_line(report))
    written = os.path.join(_WORKDIR.value, blackbox.RESULT_FILE)
  elif _STAGE.value == "queries":
    written = f"{report['path']} ({report['n_queries']} queries)"
  elif _STAGE.value in ("all", "verify", "attacks"):
    print(reporting.report_markdown(report))
    written = os.path.join(_WORKDIR.value, "report.md")
  else:
    return
  if wrote:
    print(f"wrote {written}")


def parse_flags(argv):
  """absl flag parsing with one-line errors (bad flags, unknown config overrides)."""
  try:
    return flags.FLAGS(_config_argv(argv))
  except Exception as e:  # Config overrides raise many types.
    config_error_exit(argv, e)


def run():
  """Entry point: `python -m ccdd_jax.main`."""
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
