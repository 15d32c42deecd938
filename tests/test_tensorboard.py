"""TensorBoard (run/tensorboard.py): each stage's event files, read back by TensorBoard's reader."""

import json
import pathlib
import sys
import types

import chex
import jax
import numpy as np
import pytest
from test_distill import NO_AUG
from test_distill import distill_config
from test_resume import _expert_problem
from test_resume import _Interrupt

from ccdd_jax.devices import sharding
from ccdd_jax.method import distill
from ccdd_jax.run import resume
from ccdd_jax.run import stages
from ccdd_jax.run import tensorboard
from ccdd_jax.run import workdir as workdir_lib


def read(root: pathlib.Path) -> dict:
  """{run: {tag: [(step, value)] or [(step, width, height)] for images}} under `root`."""
  # TensorBoard's own TensorFlow stub: TensorFlow (the test extra has it) takes ~8 s to import.
  sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_multiplexer  # pylint: disable=g-import-not-at-top

  everything = {event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0}
  mux = event_multiplexer.EventMultiplexer(size_guidance=everything)
  mux.AddRunsFromDirectory(str(root))
  mux.Reload()
  out = {}
  for run, tags in mux.Runs().items():
    out[run] = {t: [(e.step, e.value) for e in mux.Scalars(run, t)] for t in tags["scalars"]}
    for t in tags["images"]:
      out[run][t] = [(e.step, e.width, e.height) for e in mux.Images(run, t)]
  return out


def test_grid_is_one_row_per_class_with_trigger_slots_framed_in_red():
  pixels = np.linspace(0, 1, 3 * 8 * 8).reshape(3, 8, 8, 1)
  image = tensorboard.grid(pixels, np.array([1, 0, 1]), np.array([False, False, True]))
  assert image.shape == (2 * 34, 2 * 34, 3) and image.dtype == np.uint8  # 8 px enlarged to 32.
  assert tuple(image[0, 0]) == (128, 128, 128)  # Class 0's first image: a grey frame.
  assert tuple(image[34, 34]) == (255, 0, 0)  # Class 1's second image: a trigger slot.
  assert tuple(image[0, 34]) == (255, 255, 255)  # Class 0 has one image: the rest is white.
  np.testing.assert_array_equal(
    image[1:33, 1:33, 0], np.round(255 * pixels[1, ..., 0]).repeat(4, 0).repeat(4, 1)
  )


def _distill(store, progress=None, monitor=None):
  apply_flat, images, labels, trajectories = _expert_problem()
  cfg = distill_config(
    iterations=7, lr_img=10.0, expert_epochs=1, checkpoint_every=3, tensorboard_images_every=2
  )
  to_pixels = lambda x: np.clip(x, 0, 1)
  monitor = monitor or tensorboard.distill_monitor(
    store.path.parent, "set", cfg, to_pixels, np.asarray(labels), np.zeros(6, bool)
  )
  return distill.distill(
    cfg,
    apply_flat,
    NO_AUG,
    images,
    labels,
    trajectories,
    jax.random.PRNGKey(0),
    progress,
    store=store,
    monitor=monitor,
  )


@pytest.mark.slow
def test_distillation_scalars_and_images_and_a_resumed_run_without_duplicates(tmp_path):
  """Every iteration's history and lr, images every 2 iterations and at the last; a run
  interrupted after iteration 5 resumes from its checkpoint (3) and rewrites 3..6 only."""
  whole = _distill(resume.DistillStore(tmp_path / "whole" / "d"))
  tensorboard.stage_done(tmp_path, "distill", None)
  written = read(tmp_path / "whole" / "tensorboard")["distill/set"]
  _, lr, losses, _ = whole
  for column, tag in enumerate(tensorboard.HISTORY_TAGS):
    assert written[tag] == [(i, float(np.float32(v))) for i, v in enumerate(losses[:, column])]
  assert [step for step, _ in written["distill/lr"]] == list(range(7))
  assert written["distill/lr"][-1][1] == np.float32(lr)
  assert [step for step, *_ in written["distill/images"]] == [0, 2, 4, 6]

  def stop_at_5(it, _):
    if it == 4:
      raise _Interrupt

  with pytest.raises(_Interrupt):
    _distill(resume.DistillStore(tmp_path / "killed" / "d"), stop_at_5)
  tensorboard.stage_done(tmp_path, "distill", None)  # What a killed run's writer left.
  resumed = _distill(resume.DistillStore(tmp_path / "killed" / "d"))
  tensorboard.stage_done(tmp_path, "distill", None)
  chex.assert_trees_all_equal(resumed, whole)  # The monitor changes no result.
  again = read(tmp_path / "killed" / "tensorboard")["distill/set"]
  assert again == written
  assert len(list((tmp_path / "killed" / "tensorboard" / "distill" / "set").iterdir())) == 2


def _entry(acc, acc_w, verified, strength=None):
  entry = {"acc": {"mean": acc}, "acc_w": {"mean": acc_w}, "verified": verified}
  return entry | ({"strength": strength} if strength is not None else {})


def test_evaluation_verification_and_attacks_scalars(tmp_path):
  evaluation = {"convnet": {"distilled": _entry(0.9, 0.8, []), "real": _entry(0.95, 0.1, [])}}
  tensorboard.stage_done(tmp_path, "evaluate", evaluation)
  verification = {
    "convnet": {"distilled": {"verified": [True, True, False], "p_values": [1e-9, 1e-8, 0.5]}}
  }
  tensorboard.stage_done(tmp_path, "verify", verification)
  before = _entry(0.9, 0.8, [True, True])
  attacks = {
    "sets": {
      "distilled": {"before": before, "fine_tune": [_entry(0.85, 0.5, [True, False], 0.01)]}
    },
    "data": {
      "before": before,
      "points": {"cleanse": [_entry(0.8, 0.2, [False, False], "flagged")]},
    },
  }
  tensorboard.stage_done(tmp_path, "attacks", attacks)
  tensorboard.stage_done(tmp_path, "experts", {"clean": {}})  # Written while it runs.
  written = read(tmp_path / tensorboard.DIR)
  assert sorted(written) == ["attacks", "evaluate", "verify"]
  f32 = lambda *values: [(step, float(np.float32(v))) for step, v in enumerate(values)]
  assert written["evaluate"] == {
    "evaluate/convnet/distilled/acc": f32(0.9),
    "evaluate/convnet/distilled/acc_w": f32(0.8),
    "evaluate/convnet/real/acc": f32(0.95),
    "evaluate/convnet/real/acc_w": f32(0.1),
  }
  assert written["verify"] == {
    "verify/convnet/distilled/verified": f32(2 / 3),
    "verify/convnet/distilled/median_p": f32(1e-8),
  }
  assert written["attacks"] == {
    "attacks/distilled/fine_tune/acc": f32(0.9, 0.85),
    "attacks/distilled/fine_tune/acc_w": f32(0.8, 0.5),
    "attacks/distilled/fine_tune/verified": f32(1.0, 0.5),
    "attacks/distilled/fine_tune/strength": [(1, float(np.float32(0.01)))],
    "attacks/data/cleanse/acc": f32(0.9, 0.8),
    "attacks/data/cleanse/acc_w": f32(0.8, 0.2),
    "attacks/data/cleanse/verified": f32(1.0, 0.0),
  }


class _Store:
  """An experts store of two groups of one expert, for 2 epochs."""

  epochs, root = 2, pathlib.Path("/nowhere")

  def __init__(self):
    self.saved = []

  def finished(self, kind, start, size):
    return start == 2  # A third group, finished by an earlier run.

  def save_epoch(self, kind, start, epoch, params):
    self.saved.append((kind, start, epoch))

  def finish(self, kind, start, trajectory):
    self.saved.append((kind, start, "finish"))

  def describe(self, num_experts):
    return "nothing"


def test_experts_means_per_epoch_once_every_training_group_reported(tmp_path, monkeypatch):
  metas = {0: {"test_acc": 0.5, "acc_w": 0.25}, 1: {"test_acc": 0.7, "acc_w": 0.75}}
  monkeypatch.setattr(tensorboard.checkpoints, "read_meta", lambda root, kind, i: metas[i])
  measured = {0: ([0.1], [0.2]), 1: ([0.3], [0.4])}
  board = tensorboard.watch_experts(_Store(), tmp_path, lambda p: measured[p], every=1)
  assert board.describe(3) == "nothing"  # The store's other methods.
  assert [board.finished("clean", s, 1) for s in (0, 1, 2)] == [False, False, True]
  board.save_epoch("clean", 0, 1, 0)
  assert read(tmp_path / tensorboard.DIR) == {}  # Group 1 has not reported epoch 1 yet.
  board.save_epoch("clean", 1, 1, 1)
  board.save_epoch("clean", 0, 2, 0)  # The last epoch: measured by the store, not here.
  board.finish("clean", 0, np.zeros((1, 3)))
  board.save_epoch("clean", 1, 2, 1)
  board.finish("clean", 1, np.zeros((1, 3)))
  tensorboard.stage_done(tmp_path, "experts", {})
  assert board.store.saved[:2] == [("clean", 0, 1), ("clean", 1, 1)]
  assert read(tmp_path / tensorboard.DIR)["experts"] == {
    "experts/clean/acc": [(1, float(np.float32(0.2))), (2, float(np.float32(0.6)))],
    "experts/clean/acc_w": [(1, float(np.float32(0.3))), (2, float(np.float32(0.5)))],
  }


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(sharding, "is_writer", lambda: False)
  store = _Store()
  assert tensorboard.watch_experts(store, tmp_path, None, 1) is store
  assert tensorboard.distill_monitor(tmp_path, "s", distill_config(), None, [0], [False]) is None
  tensorboard.stage_done(tmp_path, "evaluate", {"convnet": {"real": _entry(0.9, 0.1, [])}})
  assert not (tmp_path / tensorboard.DIR).exists()


def test_fresh_removes_the_event_files(tmp_path):
  assert tensorboard.DIR in stages.BOOKKEEPING
  tensorboard.stage_done(tmp_path, "evaluate", {"convnet": {"real": _entry(0.9, 0.1, [])}})
  assert (tmp_path / tensorboard.DIR).is_dir()
  assert tensorboard.DIR in workdir_lib.clear_outputs(tmp_path)
  assert not (tmp_path / tensorboard.DIR).exists()


@pytest.mark.slow
def test_the_tiny_runs_event_files_hold_what_its_json_files_say(tiny_run):
  workdir, config, _ = tiny_run
  written = read(workdir / tensorboard.DIR)
  assert sorted(written) == [
    "distill/clean_distilled",
    "distill/distilled",
    "evaluate",
    "experts",
    "verify",
  ]
  iterations = config.distill.iterations
  with np.load(workdir / "distilled.npz") as f:
    losses, lr = f["losses"], f["lr"]
  board = written["distill/distilled"]
  assert board["distill/loss"] == [(i, float(np.float32(v))) for i, v in enumerate(losses[:, 0])]
  assert len(board["distill/twin_term"]) == iterations
  assert board["distill/lr"][-1] == (iterations - 1, float(lr))
  assert [s for s, *_ in board["distill/images"]] == [0, iterations - 1]
  experts = json.loads((workdir / "experts.json").read_text())
  evaluation = json.loads((workdir / "evaluation.json").read_text())
  verification = json.loads((workdir / "verification.json").read_text())
  for kind in ("clean", "watermarked", "fp_enhanced"):
    last = written["experts"][f"experts/{kind}/acc"][-1]
    assert last == (config.experts.epochs, pytest.approx(experts[kind]["acc"]["mean"], rel=1e-6))
  for name, entry in evaluation[config.model.name].items():
    acc = written["evaluate"][f"evaluate/{config.model.name}/{name}/acc"]
    assert acc == [(0, float(np.float32(entry["acc"]["mean"])))]
    verified = written["verify"][f"verify/{config.model.name}/{name}/verified"]
    assert verified == [(0, float(np.float32(np.mean(verification["convnet"][name]["verified"]))))]
