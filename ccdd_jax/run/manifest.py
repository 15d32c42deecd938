"""The run manifest: the config (and key) a workdir's outputs were made with.

<workdir>/manifest.json holds the flattened config, the key's fingerprint and
the data's number of classes. Each field belongs to the first stage whose
outputs it changes (the `owns` prefixes of stages.py's table); a rerun with another value is

  refused   when the field belongs to a stage before the one asked for (its
            outputs would be reused: `--stage=distill` with another
            experts.epochs), and for `--stage=all` when it belongs to any
            stage before the last one it runs (all resumes every stage);
  accepted  otherwise (`--stage=evaluate` with other eval.* fields): the
            manifest takes the new values and that stage starts over, because
            each stage's resume state is tied to `fingerprint(config, stage)`.

`--fresh` clears the outputs (workdir.clear_outputs) and so the manifest.
Fields that never change a result (`IGNORED`) are not compared, nor a field
that a newer version added at its default (schema.base_config): absent
from an older manifest, it is what that run did (new options start "off").
"""

import functools
import hashlib
import json
import pathlib

import ml_collections

from ccdd_jax import CCDDError
from ccdd_jax.config import schema
from ccdd_jax.run import reporting
from ccdd_jax.run import stages

FILE = "manifest.json"
# Paths and speed settings: the same run whatever their value.
IGNORED = (
  "concurrency",
  "num_devices",  # Float32 rounding only (sharding.py): a run may resume on another machine.
  "data.cache_dir",
  "data.tfds_data_dir",
  "distill.checkpoint_every",
  "distill.tensorboard_images_every",
  "distill.trajectory_store",  # Bitwise the same results (run/trajectory_store.py).
  "experts.tensorboard_every",
)


def record(config: ml_collections.ConfigDict, key_fingerprint: str, num_classes: int) -> dict:
  """The fields a manifest compares: the flattened config, the key and the class count."""
  flat = {}

  def walk(prefix, tree):
    for name, value in tree.items():
      if isinstance(value, dict):
        walk(f"{prefix}{name}.", value)
      elif f"{prefix}{name}" not in IGNORED:
        flat[f"{prefix}{name}"] = value

  walk("", config.to_dict())
  flat.update(key=key_fingerprint, num_classes=num_classes)
  return json.loads(json.dumps(flat, default=str))  # As it reads back from the file.


def fingerprint(fields: dict, stage: str) -> str:
  """A digest of the fields owned by `stage` and the stages before it (its resume state's tag)."""
  upto = stages.NAMES[: stages.NAMES.index(stage) + 1]
  mine = {k: v for k, v in sorted(fields.items()) if stages.owner(k) in upto}
  return hashlib.sha256(json.dumps(mine, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def _defaults() -> dict:
  """Every config field's default (settings.base_config), as a manifest records it."""
  return record(schema.base_config(), None, None)


def differing(old: dict, new: dict) -> list[str]:
  """The fields whose values differ: a field absent on one side differs, unless it is absent
  from `old` (an older manifest) and `new` holds its default."""
  defaults = _defaults()
  added = {k for k in set(new) - set(old) if k in defaults and new[k] == defaults[k]}
  keys = (set(old) | set(new)) - added
  return sorted(k for k in keys if old.get(k, "absent") != new.get(k, "absent"))


def check(workdir: pathlib.Path, fields: dict, stage: str) -> None:
  """Refuses a rerun whose config changes inputs `stage` would reuse (one-line CCDDError).

  Writes nothing (`write` does, once every up-front check has passed).
  """
  path = pathlib.Path(workdir) / FILE
  if not path.is_file():
    return
  try:
    old = json.loads(path.read_text())["fields"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CCDDError(f"cannot read {path} ({e}): rerun with --fresh to start over") from e
  # `all` resumes every stage it runs: it refuses a change owned by any before the last.
  first = stages.NAMES.index(stages.IN_ALL[-1] if stage == "all" else stage)
  refused = [k for k in differing(old, fields) if stages.NAMES.index(stages.owner(k)) < first]
  if refused:
    shown = ", ".join(f"{k} ({old.get(k, 'absent')} -> {fields.get(k, 'absent')})" for k in refused)
    hint = f"--stage={stages.owner(refused[0])}" if stage != "all" else "the stage alone"
    raise CCDDError(
      f"workdir {workdir} holds a run made with other values of {shown}: rerun with the same "
      f"config, or with --fresh to start over (or run {hint} to redo that stage)"
    )


def write(workdir: pathlib.Path, fields: dict) -> None:
  """Records the fields the workdir's outputs are (now) made with (only if they changed)."""
  path = pathlib.Path(workdir) / FILE
  content = {"format": 1, "fields": fields}
  if reporting.read_json(path) != content:
    reporting.write_json(path, content)
