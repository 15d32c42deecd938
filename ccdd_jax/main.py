r"""Runs the CCDD pipeline: python -m ccdd_jax.main --workdir runs/demo [--stage ...].

--config configs/<name>.py   a get_config() file, or a shipped config's name
                             (default: digits); override any field as
                             --config.distill.ipc=1
--stage  keygen | experts | distill | evaluate | verify | all
--key_file  the owner's key (default <workdir>/owner.key)
"""

import os
import sys

from absl import app
from absl import flags

from ccdd_jax import CCDDError
from ccdd_jax import config_loader


def one_line_exit(error: Exception) -> None:
  """Prints an error as one line and exits 1 (no traceback for users' mistakes)."""
  message = " ".join(str(error).replace("\\n", " ").split())
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


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
  ["keygen", "experts", "distill", "evaluate", "verify", "all"],
  "Which stage to run.",
)
_KEY_FILE = flags.DEFINE_string("key_file", None, "Key file (default <workdir>/owner.key).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from ccdd_jax import pipeline  # Imported late: flags first, then jax.
  from ccdd_jax import reporting

  try:
    config = config_loader.materialize(_CONFIG, flags.FLAGS["config"].serialize().split("=", 1)[-1])
    report = pipeline.run(config, _WORKDIR.value, _STAGE.value, _KEY_FILE.value)
  except CCDDError as e:
    one_line_exit(e)
  if _STAGE.value in ("all", "verify"):
    print(reporting.report_markdown(report))
    print(f"wrote {os.path.join(_WORKDIR.value, 'report.md')}")


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
