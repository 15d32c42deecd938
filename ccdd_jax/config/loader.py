"""Config files: where the shipped ones live, and the one loader (path + overrides).

A config is a Python file with `get_config()` returning an `ml_collections`
ConfigDict (big_vision's convention). The repository's top-level `configs/`
is installed as the package `ccdd_jax.configs`, so the default config loads
from any install and any working directory. Every entry point loads configs
through `ml_collections.config_flags`, the machinery `main` uses for
`--config` and `--config.<field>=<value>`: `main` through `define_config_flag`,
scripts and tests through `load`.
"""

from collections.abc import Sequence
import importlib.util
import pathlib

from absl import flags
import ml_collections
from ml_collections import config_flags

from ccdd_jax import CCDDError

DEFAULT_CONFIG = "digits"


def shipped_configs_dir() -> pathlib.Path:
  """The folder of the configs shipped with the package (the repository's `configs/`)."""
  spec = importlib.util.find_spec("ccdd_jax.configs")
  if spec is not None and spec.submodule_search_locations:
    return pathlib.Path(list(spec.submodule_search_locations)[0])
  # A source checkout on sys.path without an install: configs/ beside the package.
  return pathlib.Path(__file__).resolve().parent.parent / "configs"


def shipped_config_names() -> list[str]:
  """Names of the shipped configs (`digits`, `cifar10_ipc10`, ...)."""
  return sorted(p.stem for p in shipped_configs_dir().glob("*.py") if p.stem != "__init__")


def config_path(name_or_path: str) -> str:
  """A config file's path: an existing file as given, else a shipped config by name."""
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_file():
    return str(path)
  shipped = shipped_configs_dir() / f"{path.stem if path.suffix == '.py' else name_or_path}.py"
  if path.parent in (pathlib.Path("."), pathlib.Path("configs")) and shipped.is_file():
    return str(shipped)
  raise CCDDError(
    f"no config file {name_or_path!r}: give a path to a get_config() file or one of the "
    f"shipped configs: {', '.join(shipped_config_names())}"
  )


def define_config_flag(
  name: str = "config",
  default: str | None = None,
  flag_values: flags.FlagValues = flags.FLAGS,
  sys_argv: Sequence[str] | None = None,
):
  """Defines `--<name>` (a config file) and its `--<name>.<field>` overrides; returns the holder."""
  return config_flags.DEFINE_config_file(
    name,
    default,
    "Configuration file (a get_config() python file, or a shipped config's name).",
    flag_values=flag_values,
    lock_config=True,
    sys_argv=list(sys_argv) if sys_argv is not None else None,
  )


def materialize(holder, path: str) -> ml_collections.ConfigDict:
  """The ConfigDict a config flag holds, or a one-line CCDDError naming the file."""
  try:
    config = holder.value
    config.to_dict()  # Loading is lazy: make a bad file or override fail here.
    return config
  except Exception as e:  # Whatever the config file raises.
    lines = str(e).strip().splitlines()
    raise CCDDError(f"cannot load config {path}: {lines[-1].strip() if lines else e!r}") from e


def check_fields(config: ml_collections.ConfigDict, path: str, fields: Sequence[str]) -> None:
  """Raises a one-line CCDDError for the first dotted field that `config` does not have."""
  for field in fields:
    node = config
    for i, part in enumerate(field.split(".")):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = ".".join(field.split(".")[:i]) or "the config"
        known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise CCDDError(
          f"cannot load config {path}: unknown field {field!r} ({where} has "
          f"{', '.join(known) or 'no fields'})"
        )
      node = node[part]


def load(name_or_path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """A config file's ConfigDict with `field=value` overrides, parsed as `--config.field=value`."""
  path = config_path(name_or_path)
  argv = ["ccdd_jax", f"--config={path}", *(f"--config.{o}" for o in overrides)]
  flag_values = flags.FlagValues()
  holder = define_config_flag(default=path, flag_values=flag_values, sys_argv=argv)
  try:
    flag_values(argv)
  except Exception as e:  # The file itself, unknown fields and bad values raise many types.
    if overrides:  # Name an unknown field plainly (config_flags says only "'nope'").
      try:
        base_values = flags.FlagValues()
        base = define_config_flag(default=path, flag_values=base_values, sys_argv=argv[:2])
        base_values(argv[:2])
        base_config = base.value
      except Exception:  # The file itself fails: the error below says so.
        base_config = None
      if base_config is not None:
        check_fields(base_config, path, [o.split("=", 1)[0] for o in overrides])
    lines = str(e).strip().splitlines()
    raise CCDDError(f"cannot load config {path}: {lines[-1].strip() if lines else e!r}") from e
  return materialize(holder, path)
