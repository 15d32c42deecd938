"""Resume: distillation from its Orbax state, experts per epoch, the manifest, SIGKILL reruns."""

import hashlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import chex
import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distill import NO_AUG
from test_distill import distill_config
from test_distill import tiny_problem

from ccdd_jax import CCDDError
from ccdd_jax.config import loader as config_loader
from ccdd_jax.method import distill
from ccdd_jax.method import inner_loop
from ccdd_jax.run import manifest
from ccdd_jax.run import reporting
from ccdd_jax.run import resume

REPO = conftest.REPO


def _expert_problem():
  apply_flat, w0, images, labels = tiny_problem()
  loss_fn = lambda w, _: inner_loop.cross_entropy(apply_flat(w, images), labels)
  w1, _, _ = inner_loop.sgd_scan(loss_fn, w0, jnp.zeros(8), jnp.full(8, 0.05))
  expert = np.stack([np.stack([w0, w1])])
  noisy = np.asarray(images + 0.5 * jax.random.normal(jax.random.PRNGKey(9), images.shape))
  return apply_flat, noisy, np.asarray(labels), (expert, expert)


class _Interrupt(Exception):
  pass


@pytest.mark.slow
def test_distill_resumes_bitwise_from_its_checkpoint(tmp_path):
  apply_flat, images, labels, trajectories = _expert_problem()
  cfg = distill_config(iterations=7, lr_img=10.0, expert_epochs=1, checkpoint_every=3)
  run = lambda store, progress=None: distill.distill(
    cfg,
    apply_flat,
    NO_AUG,
    images,
    labels,
    trajectories,
    jax.random.PRNGKey(0),
    progress,
    store=store,
  )
  whole = run(None)

  def stop_at_5(it, _):
    if it == 4:
      raise _Interrupt  # After iteration 5's step: the last save was after iteration 3.

  store = resume.DistillStore(tmp_path / "d")
  with pytest.raises(_Interrupt):
    run(store, stop_at_5)
  assert store.latest() == 3
  resumed = run(resume.DistillStore(tmp_path / "d"))
  chex.assert_trees_all_equal(resumed, whole)  # Images, lr and history, bit for bit.
  assert store.latest() == 7
  again = run(resume.DistillStore(tmp_path / "d"))  # Finished: nothing recomputed.
  chex.assert_trees_all_equal(again, whole)
  with pytest.raises(CCDDError, match="another seed"):
    distill.distill(
      cfg,
      apply_flat,
      NO_AUG,
      images,
      labels,
      trajectories,
      jax.random.PRNGKey(1),
      None,
      store=store,
    )


@pytest.mark.slow
def test_non_finite_loss_stops_names_the_iteration_and_keeps_the_last_good_state(tmp_path):
  apply_flat, images, labels, trajectories = _expert_problem()
  cfg = distill_config(iterations=8, lr_img=1e12, lr_lr=1e3, expert_epochs=1, checkpoint_every=2)
  store = resume.DistillStore(tmp_path / "d")
  with pytest.raises(CCDDError, match=r"diverged at iteration (\d+)") as err:
    distill.distill(
      cfg,
      apply_flat,
      NO_AUG,
      images,
      labels,
      trajectories,
      jax.random.PRNGKey(0),
      None,
      store=store,
    )
  print(err.value)
  bad = int(str(err.value).split("iteration ")[1].split(" ")[0])
  kept = store.latest()
  assert kept < bad <= kept + 2 and "\n" not in str(err.value)
  if kept:
    saved = store.restore(
      distill._saved(distill.init_state(cfg, images, labels), [], jax.random.PRNGKey(0))
    )
    assert np.all(np.isfinite(saved["losses"])) and len(saved["losses"]) == kept


# conftest.tiny_config() as command-line overrides of its config file (the
# uninterrupted reference is the shared `tiny_run`); checkpoint_every changes no result.
TINY = (
  "model.width=8",
  "experts.num_experts=2",
  "experts.epochs=3",
  "experts.fp_normal_last_epochs=1",
  "distill.iterations=4",
  "distill.syn_steps=3",
  "distill.max_start_epoch=1",
  "distill.ipc=2",
  "distill.triggers_per_pattern=0",
  "eval.num_seeds=2",
  "eval.epochs=200",
  "eval.real_epochs=2",
  "eval.real_lr=0.1",
  "watermark.queries_per_pattern=30",
)


def test_a_field_added_since_a_workdir_was_made_differs_only_off_its_default():
  """An older manifest lacks the options added since; at their defaults they are what it ran."""
  fields = manifest.record(conftest.tiny_config(), "k", 10)
  older = {k: v for k, v in fields.items() if k != "distill.soft_labels"}
  assert manifest.differing(older, fields) == []
  assert manifest.differing(older, dict(fields, **{"distill.soft_labels": "expert"})) == [
    "distill.soft_labels"
  ]
  assert manifest.differing(fields, older) == ["distill.soft_labels"]  # Dropped: it differs.
  assert manifest.differing(older, dict(fields, **{"distill.nope": 1})) == ["distill.nope"]


def test_cli_overrides_are_the_tiny_config():
  tiny = config_loader.load(conftest.TINY_BASE, list(TINY)).to_dict()
  assert tiny == conftest.tiny_config().to_dict()


def cli(workdir, key, *extra):
  """`python -m ccdd_jax.main` on the tiny run, as a child process (stderr to a file).

  The child inherits the session's compilation cache (conftest.py): it loads the
  executables that the in-process reference run compiled, so the same bits.
  """
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  argv = [sys.executable, "-m", "ccdd_jax.main", f"--workdir={workdir}", "--key_file", str(key)]
  argv += [f"--config={conftest.TINY_BASE}"]
  argv += [f"--config.{o}" for o in (*TINY, "distill.checkpoint_every=1")] + list(extra)
  log = open(pathlib.Path(workdir).with_suffix(f".{time.monotonic_ns()}.log"), "w+")
  return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log


def _has_step(pattern, workdir):
  return any(p.name.isdigit() for p in pathlib.Path(workdir).glob(pattern))


# stage -> when it is under way (a file it writes while running).
UNDER_WAY = {
  "experts": lambda w: _has_step("resume/experts/*/*/*", w),
  "distill": lambda w: _has_step("resume/distill/*/*", w),
  "evaluate": lambda w: (pathlib.Path(w) / "resume/evaluate/done.json").is_file(),
}


def _figures(workdir):
  report = json.loads((workdir / "report.json").read_text())
  figures = {
    name: {k: report[name][k] for k in ("acc", "acc_w", "p_values", "verified")}
    for name in ("distilled", "clean_distilled", "real")
  }
  figures["experts"] = {k: v for k, v in report["experts"].items() if k != "seconds"}
  with np.load(workdir / "distilled.npz") as f:
    arrays = {k: f[k] for k in f.files}
  return figures, arrays


def kill_seed(test_name):
  """The seed of a test's kill points: $CCDD_TEST_KILL_SEED replays a run, else its name's hash."""
  if os.environ.get("CCDD_TEST_KILL_SEED"):
    return int(os.environ["CCDD_TEST_KILL_SEED"])
  return int.from_bytes(hashlib.sha256(test_name.encode()).digest()[:4], "big")


@pytest.mark.slow
def test_sigkill_in_each_stage_then_rerun_gives_the_uninterrupted_results(
  tiny_run, tmp_path, request
):
  reference, key = tiny_run[0], tiny_run[0] / "owner.key"
  seed = kill_seed(request.node.name)
  rng = random.Random(seed)
  print(f"kill points seeded with {seed} (replay: CCDD_TEST_KILL_SEED={seed})")
  killed = tmp_path / "killed"
  for stage, under_way in UNDER_WAY.items():
    proc, log = cli(killed, key)
    while not under_way(killed) and proc.poll() is None:
      time.sleep(0.02)
    delay = rng.uniform(0.0, 0.5)  # A point of the stage, drawn from the seed.
    print(f"SIGKILL in {stage}, {delay:.3f} s after it was under way")
    time.sleep(delay)
    assert proc.poll() is None, f"the run ended before the kill in {stage} (seed {seed})"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
  again, log = cli(killed, key)
  assert again.wait(timeout=600) == 0, log.seek(0) or log.read()
  log.seek(0)
  assert "resuming" in log.read()
  figures, arrays = _figures(killed)
  expected_figures, expected_arrays = _figures(reference)
  assert figures == expected_figures
  chex.assert_trees_all_equal(arrays, expected_arrays)  # Bit for bit.


def test_a_resumed_progress_bar_counts_from_the_resumed_iteration(capsys):
  progress = reporting.progress_printer("distilled", 150, start=100)
  progress(100, 0.5)
  shown = capsys.readouterr().err
  assert "100/150" in shown and "0/150" not in shown.replace("100/150", "")
