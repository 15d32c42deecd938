"""TensorBoard scalars and images of every stage, under <workdir>/tensorboard/ (process 0 only).

  run (folder)      tags (step)
  experts           experts/<kind>/acc, experts/<kind>/acc_w: the mean over the kind's
                    experts (epoch: the last, and every experts.tensorboard_every)
  distill/<set>     distill/loss and eq. 10's terms distill/expert_term, distill/twin_term,
                    distill/direct_term (distill.distill's history columns), distill/lr, the
                    learned step size (iteration, from 0); distill/images: the set as a grid,
                    one row per class, trigger slots framed in red, every
                    distill.tensorboard_images_every iterations (0 = never) and at the last
  evaluate          evaluate/<arch>/<set>/acc, .../acc_w: the mean over the seeds (0)
  verify            verify/<arch>/<set>/verified: the fraction of networks verified,
                    .../median_p: their median p-value (0)
  attacks           attacks/<set>/<attack>/acc, acc_w, verified, strength; the data's
                    attacks/data/<attack>/... (the attack's point: 0 = unattacked, then its
                    strengths in order, as in attacks.png)

Nothing here changes a result: it reads what the stages compute. The
distillation's scalars stay on the device until a checkpoint is due (every
distill.checkpoint_every iterations, or 50, and at the last), then go to the
file in one transfer: the loop never waits for a scalar, and what the file
holds is what a resumed run starts after (its writer purges later steps).

The writer: tensorboardX (its event records and summary protos, written
synchronously: `EventFile`). Measured with pip in a fresh Python 3.11 venv:
  tensorboardX 2.6.5         0.65 MB, pure Python; needs numpy, packaging and
                             protobuf, which the core install has already
                             (orbax-checkpoint, matplotlib): +0.65 MB, a core
                             dependency. It imports torch where torch is
                             installed (.[bench]: ~1 s, once).
  tensorboard 2.21 (its own  12 MB + grpcio 19 MB + tensorboard-data-server
  event_file_writer)         20 MB (a compiled binary) + werkzeug, markdown:
                             ~55 MB new; its writer reaches files through
                             tensorboard.compat, which imports TensorFlow
                             wherever it is installed (the test extra).
  torch.utils.tensorboard    torch (~750 MB installed, CPU build) plus tensorboard.
  flax.metrics.tensorboard,  import tensorflow (~1.3 GB installed, here
  clu.metric_writers         tensorflow-cpu 2.21); clu's other writer is torch's.
The tests read the files back with tensorboard's own EventAccumulator (.[test]).
"""

from collections.abc import Callable, Iterator
import itertools
import os
import pathlib
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccdd_jax.devices import sharding
from ccdd_jax.run import checkpoints
from ccdd_jax.run import preemption

DIR = "tensorboard"
FLUSH_EVERY = 50  # Iterations between transfers when distill.checkpoint_every is 0.
# The columns of distill.distill's history, in order.
HISTORY_TAGS = ("distill/loss", "distill/expert_term", "distill/twin_term", "distill/direct_term")
# tensorboardX names event files by the second and truncates one of the same name; TensorBoard
# reads a run's files in the order of their names.
_files = itertools.count()
_open = []  # The event files `stage_done` closes.


class EventFile:
  """One event file of a run, written synchronously: `flush` puts what was added on disk.

  tensorboardX's SummaryWriter queues events for a thread (and a multiprocessing
  queue) and flushes every 2 minutes: a run killed after a distillation checkpoint
  would lose scalars it never rewrites. This writes its records (tensorboardX's
  EventsWriter and summary protos) in the caller's thread.
  """

  def __init__(self, logdir: pathlib.Path, purge_step: int | None = None):
    from tensorboardX import event_file_writer  # pylint: disable=g-import-not-at-top
    from tensorboardX import summary  # pylint: disable=g-import-not-at-top
    from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

    logdir.mkdir(parents=True, exist_ok=True)
    suffix = f".{time.time_ns()}.{os.getpid()}.{next(_files)}"  # Sorts as written.
    self._events = event_file_writer.EventsWriter(str(logdir / "events"), suffix)
    self._summary, self._pb = summary, event_pb2
    if purge_step is not None:  # TensorBoard drops the run's earlier events from this step on.
      self._write(
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START), step=purge_step
      )

  def _write(self, **fields) -> None:
    self._events.write_event(self._pb.Event(wall_time=time.time(), **fields))

  def add_scalars(self, values: dict[str, float], step: int) -> None:
    """One point of each scalar tag of `values`, in one record."""
    value = self._summary.Summary.Value
    points = [value(tag=tag, simple_value=float(v)) for tag, v in values.items()]
    self._write(summary=self._summary.Summary(value=points), step=step)

  def add_image(self, tag: str, image: np.ndarray, step: int) -> None:
    """One [H, W, 3] uint8 image of `tag` (PNG)."""
    self._write(summary=self._summary.image(tag, image, dataformats="HWC"), step=step)

  def flush(self) -> None:
    """Writes what was added to the file (and fsyncs it)."""
    self._events.flush()

  def close(self) -> None:
    """Flushes and closes the file; idempotent."""
    if self._events is not None:
      self._events.close()
      self._events = None


def writer(workdir: pathlib.Path, run: str, purge_step: int | None = None) -> EventFile | None:
  """A new event file of run `run` under <workdir>/tensorboard/, or None on processes other
  than 0 (tensorboardX is imported on first use: it imports torch where torch is installed)."""
  if not sharding.is_writer():
    return None
  opened = EventFile(pathlib.Path(workdir) / DIR / run, purge_step)
  _open.append(opened)
  return opened


def grid(pixels: np.ndarray, labels: np.ndarray, from_trigger: np.ndarray) -> np.ndarray:
  """[H, W, 3] uint8: [0, 1] `pixels` one row per class (reporting.save_grid's layout), each
  image enlarged to at least 32 pixels and framed, in red where it is a trigger slot."""
  pixels = np.clip(np.asarray(pixels, np.float32), 0.0, 1.0)
  if pixels.shape[-1] == 1:
    pixels = np.repeat(pixels, 3, axis=-1)
  scale = max(1, -(-32 // pixels.shape[1]))
  pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
  h, w = pixels.shape[1:3]
  classes = sorted({int(label) for label in labels})
  per_class = max(int(np.sum(labels == c)) for c in classes)
  out = np.ones((len(classes) * (h + 2), per_class * (w + 2), 3), np.float32)
  for row, c in enumerate(classes):
    for col, i in enumerate(np.flatnonzero(labels == c)):
      cell = out[row * (h + 2) : (row + 1) * (h + 2), col * (w + 2) : (col + 1) * (w + 2)]
      cell[...] = (1.0, 0.0, 0.0) if from_trigger[i] else (0.5, 0.5, 0.5)
      cell[1:-1, 1:-1] = pixels[i]
  return np.round(255 * out).astype(np.uint8)


_copy = jax.jit(jnp.copy)  # A new buffer (~5 us); jnp.copy outside jit takes ~20 us.


def _local(x: jax.Array) -> jax.Array:
  """One local copy of a replicated array: no collective, and it outlives a donation of `x`."""
  return _copy(x.addressable_data(0))


class DistillBoard:
  """distill.distill's `monitor` for one set: its history and lr per iteration, its images."""

  def __init__(
    self,
    workdir: pathlib.Path,
    name: str,
    set_config: ml_collections.ConfigDict,
    to_grid: Callable[[np.ndarray], np.ndarray],
  ):
    self.workdir, self.run, self.to_grid = workdir, f"distill/{name}", to_grid
    self.total = set_config.iterations
    self.every = set_config.get("checkpoint_every", 0) or FLUSH_EVERY
    self.images_every = set_config.get("tensorboard_images_every", 0)
    self.pending, self.writer = [], None

  def __call__(self, it: int, losses: jax.Array, state: dict) -> None:
    if self.writer is None:  # A resumed run starts at `it`: later steps of the last are dropped.
      self.writer = writer(self.workdir, self.run, purge_step=it or None)
    self.pending.append((it, losses.addressable_data(0), _local(state["lr"])))
    if self.images_every and (it % self.images_every == 0 or it + 1 == self.total):
      images = np.asarray(state["images"].addressable_data(0))  # Waits for this step only.
      self.writer.add_image("distill/images", self.to_grid(images), it)
    if (it + 1) % self.every == 0 or it + 1 == self.total or preemption.received():
      self.flush()  # Where distill saves (and waits); a signalled run may save at this step.
    if it + 1 == self.total:
      self.writer.close()

  def flush(self) -> None:
    """Writes the pending iterations' scalars (one transfer)."""
    values = jax.device_get([(losses, lr) for _, losses, lr in self.pending])
    for (it, _, _), (losses, lr) in zip(self.pending, values):
      points = dict(zip(HISTORY_TAGS, np.ravel(losses).tolist()))
      self.writer.add_scalars({**points, "distill/lr": float(lr)}, it)
    self.pending = []
    self.writer.flush()  # On disk before distill saves its checkpoint.


def distill_monitor(
  workdir: pathlib.Path,
  name: str,
  set_config: ml_collections.ConfigDict,
  to_pixels: Callable[[np.ndarray], np.ndarray],
  labels: np.ndarray,
  from_trigger: np.ndarray,
) -> DistillBoard | None:
  """The `monitor` of set `name`'s distillation on process 0; None on the others."""
  if not sharding.is_writer():
    return None
  labels, from_trigger = np.asarray(labels), np.asarray(from_trigger, bool)
  to_grid = lambda images: grid(to_pixels(images), labels, from_trigger)
  return DistillBoard(workdir, name, set_config, to_grid)


class ExpertsBoard:
  """A resume.ExpertStore that also writes the experts' Acc and Acc_W, averaged over a kind's
  experts, at each epoch that every group training in this run has reported.

  The last epoch's come from what the store measures for meta.json (free); every
  `experts.tensorboard_every` epochs before it, this measures the networks itself.
  """

  def __init__(self, store: Any, workdir: pathlib.Path, metrics_fn: Callable, every: int):
    self.store, self.workdir, self.metrics_fn, self.every = store, workdir, metrics_fn, every
    self.expected, self.sums, self.writer = {}, {}, None
    self.lock = threading.Lock()

  def __getattr__(self, name: str) -> Any:
    return getattr(self.store, name)

  def finished(self, kind: str, start: int, size: int) -> bool:
    """The store's answer; a group it has not finished will report its epochs."""
    done = self.store.finished(kind, start, size)
    if not done:
      with self.lock:
        self.expected[kind] = self.expected.get(kind, 0) + size
    return done

  def save_epoch(self, kind: str, start: int, epoch: int, params: Any) -> None:
    """Saves the epoch; measures the group's networks every `every` epochs before the last."""
    self.store.save_epoch(kind, start, epoch, params)
    if self.every and epoch % self.every == 0 and epoch < self.store.epochs:
      self._add(kind, epoch, *self.metrics_fn(params))

  def finish(self, kind: str, start: int, trajectory: Any) -> None:
    """Finishes the group (the store measures its last epoch for meta.json)."""
    self.store.finish(kind, start, trajectory)
    size = jax.tree_util.tree_leaves(trajectory)[0].shape[0]
    metas = [checkpoints.read_meta(self.store.root, kind, i) for i in range(start, start + size)]
    self._add(kind, self.store.epochs, [m["test_acc"] for m in metas], [m["acc_w"] for m in metas])

  def _add(self, kind: str, epoch: int, acc: list, acc_w: list) -> None:
    """Adds a group's figures; writes the kind's means once every group has reported."""
    with self.lock:
      count, acc_sum, acc_w_sum = self.sums.get((kind, epoch), (0, 0.0, 0.0))
      count, acc_sum, acc_w_sum = count + len(acc), acc_sum + sum(acc), acc_w_sum + sum(acc_w)
      self.sums[(kind, epoch)] = (count, acc_sum, acc_w_sum)
      if count == self.expected.get(kind):
        self.writer = self.writer or writer(self.workdir, "experts")
        means = {f"experts/{kind}/acc": acc_sum / count, f"experts/{kind}/acc_w": acc_w_sum / count}
        self.writer.add_scalars(means, epoch)
        self.writer.flush()


def watch_experts(store: Any, workdir: pathlib.Path, metrics_fn: Callable, every: int) -> Any:
  """`store` as an ExpertsBoard on process 0 (`metrics_fn(params) -> (acc, acc_w)` lists)."""
  return ExpertsBoard(store, workdir, metrics_fn, every) if sharding.is_writer() else store


def _mean(values) -> float:
  return float(np.mean(np.asarray(values, np.float64)))


def _evaluation(result: dict) -> Iterator[tuple[str, float, int]]:
  for arch, evaluated in result.items():
    for name, entry in evaluated.items():
      yield f"evaluate/{arch}/{name}/acc", entry["acc"]["mean"], 0
      yield f"evaluate/{arch}/{name}/acc_w", entry["acc_w"]["mean"], 0


def _verification(result: dict) -> Iterator[tuple[str, float, int]]:
  for arch, verified in result.items():
    for name, entry in verified.items():
      yield f"verify/{arch}/{name}/verified", _mean(entry["verified"]), 0
      yield f"verify/{arch}/{name}/median_p", float(np.median(entry["p_values"])), 0


def _attack_points(prefix: str, before: dict, points: dict) -> Iterator[tuple[str, float, int]]:
  """Each attack's series: the unattacked point (0), then its strengths in order."""
  for attack, entries in points.items():
    for step, entry in enumerate([before, *entries]):
      tag = f"attacks/{prefix}/{attack}"
      yield f"{tag}/acc", entry["acc"]["mean"], step
      yield f"{tag}/acc_w", entry["acc_w"]["mean"], step
      yield f"{tag}/verified", _mean(entry["verified"]), step
      if isinstance(entry.get("strength"), int | float):
        yield f"{tag}/strength", float(entry["strength"]), step


def _attacks(result: dict) -> Iterator[tuple[str, float, int]]:
  for set_name, points in result.get("sets", {}).items():
    attacks = {k: v for k, v in points.items() if k != "before"}
    yield from _attack_points(set_name, points["before"], attacks)
  if result.get("data"):
    yield from _attack_points("data", result["data"]["before"], result["data"]["points"])


_RESULTS = {"evaluate": _evaluation, "verify": _verification, "attacks": _attacks}


def stage_done(workdir: pathlib.Path, stage: str, result: dict | None) -> None:
  """After a stage: writes the scalars of its summary (evaluate, verify, attacks; the others
  write theirs while they run; None: nothing) and closes every event file it opened."""
  scalars = _RESULTS.get(stage)
  points = list(scalars(result)) if scalars and result and sharding.is_writer() else []
  if points:
    board = writer(workdir, stage)
    for tag, value, step in points:
      board.add_scalars({tag: value}, step)
  while _open:
    _open.pop().close()
