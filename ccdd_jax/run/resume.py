"""Resumable stages: in-progress state under <workdir>/resume/, and the up-front input checks.

  experts   resume/experts/<kind>/<first expert:04d>/<epoch>/  one Orbax CheckpointManager
            per group of experts, a step per finished epoch; a finished group
            moves to trajectories/ (checkpoints.save_stacked) with the stage's
            fingerprint in each expert's meta.json
  distill   resume/distill/<set>/<iteration>/  CheckpointManager of the images,
            lr, optimiser state, eq. 10's history and the PRNG key, every
            distill.checkpoint_every iterations and at the end
  evaluate  resume/evaluate/done.json  the (architecture, set) pairs whose
            networks (models/, Orbax) and evaluation.json entry are written

Each stage directory holds the `manifest.fingerprint` of the fields its
results depend on; state made with another fingerprint is discarded (the
stage starts over). Orbax writes each step into a temporary directory and
renames it when complete, so a kill never leaves a half step that is read.
The up-front checks (`check_*`) read only metadata and fail in one line.
"""

import hashlib
import pathlib
import shutil
import threading
from typing import Any
import zipfile

import jax
import numpy as np
import orbax.checkpoint as ocp

from ccdd_jax import CCDDError
from ccdd_jax.devices import sharding
from ccdd_jax.method import distill
from ccdd_jax.method import evaluate
from ccdd_jax.method.experts import KINDS
from ccdd_jax.run import checkpoints
from ccdd_jax.run import reporting
from ccdd_jax.run import workdir as workdir_lib

FINGERPRINT_FILE = "fingerprint"


def stage_dir(workdir: pathlib.Path, stage: str, fingerprint: str) -> tuple[pathlib.Path, bool]:
  """The stage's resume directory, emptied if it was made for another fingerprint; (dir, kept)."""
  path = workdir_lib.resume_dir(workdir, stage)
  tag = path / FINGERPRINT_FILE
  kept = tag.is_file() and tag.read_text().strip() == fingerprint
  sharding.barrier(f"ccdd read {stage} state")  # Every process read the tag before it changes.
  if sharding.is_writer() and not kept:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    reporting.write_text(tag, fingerprint + "\n")
  sharding.barrier(f"ccdd made {stage} state")
  return path, kept


def _manager(path: pathlib.Path, max_to_keep: int | None) -> ocp.CheckpointManager:
  """A synchronous CheckpointManager (save returns once the step is final)."""
  checkpoints._quiet_orbax()  # pylint: disable=protected-access
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
  )
  return ocp.CheckpointManager(path.absolute(), options=options)


def _spec(x: Any) -> tuple[tuple, np.dtype]:
  """(shape, dtype) of an array or a jax.ShapeDtypeStruct."""
  return (tuple(x.shape), np.dtype(x.dtype)) if hasattr(x, "dtype") else _spec(np.asarray(x))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(*_spec(x)), tree)


def _restore(manager: ocp.CheckpointManager, step: int, like: Any, what: str) -> Any:
  """Restores one step shaped like `like`, or fails in one line (corrupt, other shapes)."""
  where = pathlib.Path(str(manager.directory)) / str(step)
  try:
    restored = manager.restore(step, args=ocp.args.StandardRestore(_abstract(like)))
  except Exception as e:  # Orbax raises assorted types for bad or mismatched checkpoints.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CCDDError(
      f"cannot restore the {what} checkpoint {where}: {msg[:300]} (rerun with --fresh)"
    ) from e
  restored = jax.tree.map(np.asarray, restored)
  for (path, a), b in zip(
    jax.tree_util.tree_flatten_with_path(restored)[0], jax.tree.leaves(like), strict=True
  ):
    if (a.shape, a.dtype) != _spec(b):
      raise CCDDError(
        f"the {what} checkpoint {where} holds {jax.tree_util.keystr(path)} as "
        f"{a.dtype}{list(a.shape)}, this run needs {_spec(b)[1]}{list(_spec(b)[0])} "
        "(another model or image size? rerun with --fresh)"
      )
  return restored


class ExpertStore:
  """experts.ExpertStore on disk: each group's epochs (Orbax), finished experts (trajectories/)."""

  def __init__(self, workdir, fingerprint, like, num_experts, epochs, metrics_fn):
    self.dir, kept = stage_dir(workdir, "experts", fingerprint)
    self.root = workdir_lib.trajectories_dir(workdir)
    self.fingerprint, self.like, self.epochs, self.metrics_fn = (
      fingerprint,
      like,
      epochs,
      metrics_fn,
    )
    self.lock = threading.Lock()
    for kind in KINDS:  # Experts of another config (or beyond num_experts) are dropped.
      for i in checkpoints.list_experts(self.root, kind):
        if (not kept or i >= num_experts or not self._current(kind, i)) and sharding.is_writer():
          shutil.rmtree(self.root / kind / f"{i:04d}")
    sharding.barrier("ccdd dropped experts")

  def _current(self, kind: str, index: int) -> bool:
    meta = checkpoints.read_meta(self.root, kind, index)
    return meta.get("fingerprint") == self.fingerprint and meta["num_epochs"] == self.epochs

  def _group_dir(self, kind: str, start: int) -> pathlib.Path:
    return self.dir / kind / f"{start:04d}"

  def finished(self, kind: str, start: int, size: int) -> bool:
    """Whether experts start..start+size-1 of `kind` are saved with this fingerprint."""
    done = set(checkpoints.list_experts(self.root, kind))
    return all(i in done for i in range(start, start + size))

  def epochs_done(self, kind: str, start: int, size: int) -> list:
    """The group's saved epochs 1..k ([size, ...] params each), in order."""
    path = self._group_dir(kind, start)
    if not path.is_dir():
      return []
    like = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((size,) + _spec(x)[0], _spec(x)[1]), self.like
    )
    with self.lock:
      manager = _manager(path, None)
      try:
        steps = sorted(manager.all_steps())
        steps = [s for i, s in enumerate(steps) if s == i + 1]  # 1..k without a gap.
        return [_restore(manager, s, like, f"{kind} experts") for s in steps]
      finally:
        manager.close()

  def save_epoch(self, kind: str, start: int, epoch: int, params: Any) -> None:
    """Saves one finished epoch of a group."""
    with self.lock:
      manager = _manager(self._group_dir(kind, start), None)
      try:
        manager.save(epoch, args=ocp.args.StandardSave(params))
        manager.wait_until_finished()
      finally:
        manager.close()

  def finish(self, kind: str, start: int, trajectory: Any) -> None:
    """Measures the group's final networks, saves its trajectories, drops its epochs."""
    with self.lock:
      acc, acc_w = self.metrics_fn(jax.tree.map(lambda x: x[:, -1], trajectory))
      meta = [
        {"test_acc": a, "acc_w": w, "fingerprint": self.fingerprint} for a, w in zip(acc, acc_w)
      ]
      checkpoints.save_stacked(self.root, kind, trajectory, start, meta, overwrite=True)
      if sharding.is_writer():
        shutil.rmtree(self._group_dir(kind, start), ignore_errors=True)
      sharding.barrier(f"ccdd finished {kind} {start}")  # The others read its meta.json next.

  def final_params(self, kind: str) -> Any:
    """The last epoch of every saved expert of `kind`, stacked."""
    stacked = checkpoints.load_trajectories(self.root, kind, self.like, epochs=[self.epochs])
    return jax.tree.map(lambda x: x[:, 0], stacked)

  def metrics(self, kind: str) -> tuple[list[float], list[float]]:
    """Acc and Acc_W of each saved expert of `kind` (from meta.json)."""
    metas = [
      checkpoints.read_meta(self.root, kind, i) for i in checkpoints.list_experts(self.root, kind)
    ]
    return [m["test_acc"] for m in metas], [m["acc_w"] for m in metas]

  def describe(self, num_experts: int) -> str:
    """ "clean 8/8, watermarked 3/8 experts done, ..., expert 4 at epoch 2" (or "" if nothing)."""
    parts, partial = [], []
    for kind in KINDS:
      done = len(checkpoints.list_experts(self.root, kind))
      if done:
        parts.append(f"{kind} {done}/{num_experts}")
      for group in sorted((self.dir / kind).glob("[0-9]*")) if (self.dir / kind).is_dir() else []:
        steps = [int(p.name) for p in group.iterdir() if p.name.isdigit()]
        if steps:
          partial.append(f"{kind} expert {int(group.name) + 1} at epoch {max(steps)}")
    if not parts and not partial:
      return ""
    return (
      ", ".join(parts)
      + " experts done" * bool(parts)
      + "; " * bool(parts and partial)
      + (", ".join(partial))
    )


class DistillStore:
  """The distillation state of one set (distill.distill's `store`): an Orbax CheckpointManager."""

  def __init__(self, path: pathlib.Path, columns: int = distill.HISTORY_COLUMNS):
    self.path = pathlib.Path(path)
    self.columns = columns  # Of the loss history (crafting.HISTORY_COLUMNS for a crafted set).

  def latest(self) -> int:
    """The last saved iteration (0 if none)."""
    if not self.path.is_dir():
      return 0
    manager = _manager(self.path, 2)
    try:
      return manager.latest_step() or 0
    finally:
      manager.close()

  def restore(self, like: dict) -> dict | None:
    """{"state", "losses", "rng"} of the last saved iteration, shaped like `like`, or None."""
    step = self.latest()
    if not step:
      return None
    like = dict(like, losses=np.zeros((step, self.columns), np.float32))
    manager = _manager(self.path, 2)
    try:
      return _restore(manager, step, like, "distillation")
    finally:
      manager.close()

  def save(self, iteration: int, tree: dict) -> None:
    """Saves the state after `iteration` iterations (keeps the last two)."""
    manager = _manager(self.path, 2)
    try:
      manager.save(iteration, args=ocp.args.StandardSave(jax.device_get(tree)), force=True)
      manager.wait_until_finished()
    finally:
      manager.close()


def sets_digest(workdir: pathlib.Path) -> str:
  """A digest of the distilled sets' arrays ("" if there are none): what evaluations depend on."""
  digest = hashlib.sha256()
  for name in evaluate.DISTILLED_SETS:
    path = pathlib.Path(workdir) / f"{name}.npz"
    if not path.is_file():
      return ""
    try:
      with np.load(path) as f:
        for key in sorted(f.files):
          digest.update(key.encode() + np.ascontiguousarray(f[key]).tobytes())
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
      return "unreadable"  # A corrupt set: whatever was measured on it is stale.
  return digest.hexdigest()[:16]


def drop_stale(workdir: pathlib.Path, before: str) -> None:
  """After distilling: if the sets changed, drops what was measured on the old ones."""
  if sets_digest(workdir) == before:
    return  # Resumed from finished states: the same sets, bit for bit.
  if not sharding.is_writer():
    return  # Process 0 deletes; the next stage reads after pipeline.run's barrier.
  for stale in ("evaluation.json", "verification.json", "attacks.json"):
    (pathlib.Path(workdir) / stale).unlink(missing_ok=True)
  shutil.rmtree(workdir_lib.resume_dir(workdir, "evaluate"), ignore_errors=True)


def evaluated(workdir: pathlib.Path, fingerprint: str) -> set[tuple[str, str]]:
  """The (architecture, set) pairs evaluated with this fingerprint and these distilled sets."""
  path, _ = stage_dir(workdir, "evaluate", fingerprint + sets_digest(workdir))
  return {tuple(pair) for pair in reporting.read_json(path / "done.json").get("done", [])}


def mark_evaluated(workdir: pathlib.Path, done: set[tuple[str, str]]) -> None:
  """Records the pairs whose networks and evaluation.json entries are written."""
  path = workdir_lib.resume_dir(workdir, "evaluate") / "done.json"
  reporting.write_json(path, {"done": sorted(list(pair) for pair in done)})


def check_experts(root: pathlib.Path, kinds, like: Any, epochs: int, num_experts: int) -> None:
  """Before distilling: every kind has `num_experts` finished experts with >= epochs - 1 epochs
  and `like`'s parameter shapes (metadata only: no array is read)."""
  specs = checkpoints._leaf_specs(like)  # pylint: disable=protected-access
  for kind in kinds:
    indices = checkpoints.list_experts(root, kind)
    if len(indices) < num_experts:
      raise CCDDError(
        f"{len(indices)} of {num_experts} {kind} experts are finished under {root}: "
        "run --stage=experts first (it resumes)"
      )
    for i in indices[:num_experts]:
      meta = checkpoints.read_meta(root, kind, i)
      if meta["num_epochs"] < epochs - 1:
        raise CCDDError(
          f"{kind} expert {i} under {root} has {meta['num_epochs']} epochs; distillation "
          f"needs {epochs - 1} (distill.max_start_epoch + distill.expert_epochs)"
        )
      checkpoints._check_like(f"{kind} expert {i}", meta["leaves"], specs)  # pylint: disable=protected-access


def check_distilled(workdir: pathlib.Path, names, image_shape: tuple, num_classes: int) -> dict:
  """Before evaluating: the distilled sets exist and fit the data's images and classes."""
  sets = {}
  for name in names:
    s = sets[name] = workdir_lib.load_distilled(workdir, name)
    logits = s.get("label_logits")  # Learned soft labels: one row per image, one per class.
    if (
      tuple(s["images"].shape[1:]) != tuple(image_shape)
      or s["labels"].max() >= num_classes
      or (logits is not None and logits.shape != (len(s["labels"]), num_classes))
    ):
      raise CCDDError(
        f"{name}.npz in {workdir} holds {list(s['images'].shape[1:])} images of labels up to "
        f"{s['labels'].max()}, the data has {list(image_shape)} images of {num_classes} "
        "classes: rerun --stage=distill"
      )
  return sets


def check_networks(workdir: pathlib.Path, pairs) -> None:
  """Before verifying or attacking: the evaluated networks of each (architecture, set) exist."""
  for arch, name in pairs:
    if not workdir_lib.networks_dir(workdir, arch, name).is_dir():
      raise CCDDError(
        f"no evaluated {arch} networks of {name} in {workdir}: run --stage=evaluate first"
      )
