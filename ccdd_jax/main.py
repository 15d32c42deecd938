r"""Runs the CCDD pipeline: python -m ccdd_jax.main --workdir runs/demo [--stage ...].

  --config configs/<name>.py   (default configs/digits.py; override fields as
                                --config.distill.ipc=1)
  --stage  keygen | experts | distill | evaluate | verify | all
  --key_file  the owner's key (default <workdir>/owner.key)
"""

import os
import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ccdd_jax import CCDDError

_DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / "digits.py"



def one_line_exit(error: Exception) -> None:
  """Prints an error as one line and exits 1 (no traceback for users' mistakes)."""
  message = " ".join(str(error).replace("\\n", " ").split())
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


try:  # Registering the flag already reads --config.* overrides from sys.argv.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", str(_DEFAULT_CONFIG), "Configuration file (a get_config() python file).",
      lock_config=True)
except Exception as e:  # pylint: disable=broad-except  # Overrides raise many types.
  one_line_exit(e)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for keys, trajectories, results.")
_STAGE = flags.DEFINE_enum("stage", "all",
                           ["keygen", "experts", "distill", "evaluate", "verify", "all"],
                           "Which stage to run.")
_KEY_FILE = flags.DEFINE_string("key_file", None, "Key file (default <workdir>/owner.key).")


def load_config():
  """The config file's ConfigDict, or a one-line CCDDError naming the file."""
  try:
    config = _CONFIG.value
    config.to_dict()  # Loading is lazy: make a bad file or override fail here.
    return config
  except Exception as e:  # pylint: disable=broad-except  # Whatever the config file raises.
    first = str(e).strip().splitlines()
    path = flags.FLAGS["config"].serialize().split("=", 1)[-1]
    raise CCDDError(f"cannot load config {path}: {first[-1].strip() if first else e}") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from ccdd_jax import pipeline  # pylint: disable=g-import-not-at-top
  try:
    config = load_config()
    report = pipeline.run(config, _WORKDIR.value, _STAGE.value, _KEY_FILE.value)
  except CCDDError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if _STAGE.value in ("all", "verify"):
    print(pipeline.report_markdown(report))
    print(f"wrote {os.path.join(_WORKDIR.value, 'report.md')}")


def parse_flags(argv):
  """absl flag parsing with one-line errors (bad flags, unknown config overrides)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # Config overrides raise many types.
    one_line_exit(e)


def run():
  """Entry point: `python -m ccdd_jax.main`."""
  flags.mark_flag_as_required("workdir")
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
