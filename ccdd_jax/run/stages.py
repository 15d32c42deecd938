"""The stages of a run: the one table that declares them.

Each row says what a stage reads and writes in the workdir, which config
fields it owns, and whether `--stage=all` runs it; the stage's code is
`pipeline.stage_<name>(ctx)`. Everything else that lists stages derives
from this table: main.py's --stage flag, `pipeline.run`'s dispatch and the
checks of its inputs, `--fresh` (workdir.clear_outputs removes `OUTPUTS`),
and the manifest's order and field owners (manifest.py).

This module imports nothing heavy: main.py reads it before JAX starts.
"""

from typing import NamedTuple


class Stage(NamedTuple):
  """One stage of the table."""

  name: str
  does: str
  writes: tuple[str, ...]  # Workdir entries it writes; --fresh removes them.
  # Inputs checked before any work (Context.check_inputs): "experts", "distilled_sets",
  # "evaluated_networks", "attacked_networks".
  reads: tuple[str, ...] = ()
  # Config field prefixes whose values change its outputs (the longest prefix wins;
  # "" = every field no other stage owns). The manifest refuses a rerun that
  # changes a field of a stage before the one asked for.
  owns: tuple[str, ...] = ()
  in_all: bool = True  # Run by --stage=all.


TABLE = (
  # The key and its commitment are never outputs: --fresh keeps them.
  Stage("keygen", "the owner's key (owner.key or --key_file) and owner.commitment", ()),
  Stage(
    "queries",
    "stamped held-out images for a suspect that can only be queried",
    ("queries.npz",),
    owns=("key", "num_classes", "watermark.", "data."),
  ),
  Stage(
    "experts",
    "clean, watermarked (eq. 6) and fine-pruning-enhanced (eq. 8) experts",
    ("trajectories", "experts.json"),
    owns=("", "watermark.ratio"),
  ),
  Stage(
    "distill",
    "the watermarked and the clean distilled sets (eq. 9, 10)",
    (
      "distilled.npz",
      "clean_distilled.npz",
      "distilled.png",
      "clean_distilled.png",
      "distill.json",
    ),
    reads=("experts",),
    owns=("distill.",),
  ),
  Stage(
    "evaluate",
    "fresh networks trained on each set: Acc, Acc_W",
    ("models", "evaluation.json"),
    reads=("distilled_sets",),
    owns=("eval.",),
  ),
  Stage(
    "verify",
    "each network queried with the key's triggers: the exact tests, the report",
    ("verification.json", "verification_blackbox.json", "report.json", "report.md"),
    reads=("evaluated_networks",),
    owns=("watermark.alpha",),
  ),
  Stage(
    "attacks",
    "removal attacks on the networks and on the distilled data, detection",
    ("attacks.json", "attacks.png", "attacks_data.png"),
    reads=("evaluated_networks", "attacked_networks"),
    owns=("attacks.",),
    in_all=False,
  ),
)

NAMES = tuple(stage.name for stage in TABLE)
IN_ALL = tuple(stage.name for stage in TABLE if stage.in_all)
# What every stage keeps beside its outputs: resume state, the manifest, the timings, the
# TensorBoard event files (tensorboard.py). Never run.lock: --fresh runs under it (lock.py).
BOOKKEEPING = ("resume", "manifest.json", "timings.json", "tensorboard")
# Everything --fresh removes (never the key file).
OUTPUTS = BOOKKEEPING + tuple(entry for stage in TABLE for entry in stage.writes)


def get(name: str) -> Stage:
  """The row of stage `name`."""
  return TABLE[NAMES.index(name)]


def rerun_hint(filename: str) -> str:
  """What to run to rewrite a workdir entry: the stage that writes it, or --fresh."""
  writers = [stage.name for stage in TABLE if filename in stage.writes]
  return f"rerun --stage={writers[0]}" if writers else "rerun with --fresh to start over"


def owner(field: str) -> str:
  """The first stage whose outputs a manifest field changes (the longest owning prefix)."""
  owning = [
    (len(prefix), stage.name)
    for stage in TABLE
    for prefix in stage.owns
    if field == prefix or field.startswith(prefix)
  ]
  return max(owning)[1]
