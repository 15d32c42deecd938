"""The whole method end to end on a tiny digits config, and the CLI's errors."""

import json
import os
import shutil
import subprocess
import sys

import conftest
import jax
import ml_collections
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.data import preprocess
from ccdd_jax.method import evaluate
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.run import checkpoints
from ccdd_jax.run import pipeline
from ccdd_jax.run import stages
from ccdd_jax.run import workdir as workdir_lib

REPO = conftest.REPO


@pytest.mark.slow
def test_outputs_and_report(tiny_run):
  workdir, config, report = tiny_run
  for name in (
    "distilled.npz",
    "clean_distilled.npz",
    "distilled.png",
    "report.json",
    "report.md",
    "owner.key",
  ):
    assert (workdir / name).is_file(), name
  with np.load(workdir / "distilled.npz") as f:
    d = config.distill  # IPC images per class, plus the carriers beyond IPC per pattern.
    size = 10 * d.ipc + config.watermark.n_patterns * d.carriers_per_pattern
    assert f["images"].shape == (size, 8, 8, 1)
    assert sorted(set(f["labels"].tolist())) == list(range(10))
    assert float(f["lr"]) > 0
    assert f["preprocess_mean"].shape == f["preprocess_std"].shape == (1,)
    assert float(f["preprocess_std"][0]) > 0 and "zca_transform" not in f.files
    # The exported pixels are the images mapped back through the saved transform.
    preprocessor = preprocess.Preprocessor.from_arrays(f)
    np.testing.assert_allclose(f["pixels"], preprocessor.to_pixels(f["images"]), atol=1e-6)
    assert 0.0 <= f["pixels"].min() and f["pixels"].max() <= 1.0
  on_disk = json.loads((workdir / "report.json").read_text())
  for name in evaluate.SETS:
    entry = on_disk[name]
    for metric in ("acc", "acc_w"):
      assert set(entry[metric]) == {"mean", "std", "runs"}
      assert len(entry[metric]["runs"]) == config.eval.num_seeds
      assert 0.0 <= entry[metric]["mean"] <= 1.0
    assert len(entry["p_values"]) == config.eval.num_seeds
    assert all(0.0 <= p <= 1.0 for p in entry["p_values"])
    assert len(entry["verified"]) == config.eval.num_seeds
  # Trained on real data, the networks beat chance.
  assert on_disk["real"]["acc"]["mean"] > 0.3
  # The verdicts: every network trained on the watermarked set is verified at alpha; none
  # trained on the clean distilled set or on real data is (conftest.tiny_config, TINY_KEY).
  distilled = on_disk["distilled"]
  assert distilled["verified"] == [True] * config.eval.num_seeds, distilled["p_values"]
  assert all(p <= config.watermark.alpha for p in distilled["p_values"])
  for name in ("clean_distilled", "real"):
    assert on_disk[name]["verified"] == [False] * config.eval.num_seeds, on_disk[name]
  assert report["distilled"]["verified"] == distilled["verified"]
  for key in ("alpha", "n_patterns", "num_classes", "wall_seconds", "config"):
    assert key in on_disk
  assert set(stages.IN_ALL) <= set(on_disk["wall_seconds"])
  assert "| distilled |" in (workdir / "report.md").read_text()
  # Orbax trajectories of every kind and the paired initialisation.
  for kind in ("clean", "watermarked", "fp_enhanced"):
    assert (workdir / "trajectories" / kind / "0001" / "meta.json").is_file()


@pytest.mark.slow
def test_cross_architecture_evaluation_merges_into_the_report(tiny_run, tmp_path):
  """--stage=evaluate with eval.models adds architectures; verify covers them all.

  A second ConvNet (no norm) keeps this cheap on CPU; test_model_zoo.py builds and
  differentiates the other architectures of the registry.
  """
  workdir, config, _ = tiny_run
  run = tmp_path / "cross"
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("trajectories"))
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.models = "convnet:none"
  config.eval.epochs = 2
  evaluation = pipeline.run(config, str(run), "evaluate")
  assert list(evaluation) == ["convnet", "convnet:none"]
  # Only the distillation model has the real-data baseline (eval.real_all_models off).
  assert set(evaluation["convnet:none"]) == {"distilled", "clean_distilled"}
  assert set(evaluation["convnet"]) == set(evaluate.SETS)  # Kept from the first run.
  report = pipeline.run(config, str(run), "verify")
  for label in ("convnet", "convnet:none"):
    entry = report["architectures"][label]["distilled"]
    assert len(entry["acc"]["runs"]) == len(entry["p_values"]) == config.eval.num_seeds
    assert (run / "models" / label.replace(":", "_") / "clean_distilled").is_dir()
  assert report["distilled"] == report["architectures"]["convnet"]["distilled"]
  markdown = (run / "report.md").read_text()
  assert "| convnet:none | distilled |" in markdown
  assert "| convnet:none | clean_distilled |" in markdown


@pytest.mark.parametrize(
  "models,message",
  [
    ("convnet,resnet19", "resnet19"),
    ("vgg11:group", "vgg11:group"),
    ("convnet:batch", "convnet:batch"),
    ("alexnet,alexnet", "twice"),
  ],
)
def test_bad_eval_models_fail_before_any_work(tmp_path, models, message):
  config = conftest.tiny_config()
  config.eval.models = models
  with pytest.raises(CCDDError, match=message):
    pipeline.run(config, str(tmp_path), "keygen")


@pytest.mark.slow
def test_key_file_is_private_and_key_appears_nowhere_else(tiny_run):
  workdir, _, _ = tiny_run
  key_path = workdir / "owner.key"
  assert key_path.stat().st_mode & 0o777 == 0o600
  key = watermark.read_key_file(key_path)
  needles = [key, key.hex().encode(), key.hex().upper().encode()]
  for path in workdir.rglob("*"):
    if path.is_file() and path != key_path:
      content = path.read_bytes()
      assert not any(n in content for n in needles), path


@pytest.mark.slow
def test_networks_that_never_saw_a_key_are_not_verified(tiny_run):
  """Zero claims at alpha = 1e-6 over 60 random keys, for every evaluated network."""
  workdir, config, _ = tiny_run
  ctx = pipeline.Context(config, workdir, workdir / "owner.key")
  claims, trials = 0, 0
  for name in evaluate.SETS:
    params = checkpoints.restore_networks(
      workdir_lib.networks_dir(workdir, "convnet", name),
      ctx.net.like_params(),
      config.eval.num_seeds,
    )
    one = jax.tree_util.tree_map(lambda x: x[0], params)
    predict = lambda u8, one=one: np.asarray(
      ctx.net.apply(one, ctx.preprocess.apply(u8)).argmax(-1)
    ).astype(np.int64)
    for trial in range(20):
      result = verify.verify(
        predict,
        watermark.generate_key(),
        ctx.dataset.test_images,
        ctx.dataset.test_labels,
        n_patterns=10,
        patch_size=4,
        num_classes=10,
        m=30,
        alpha=1e-6,
        rng=np.random.default_rng(trial),
      )
      claims += result["verified"]
      trials += 1
  assert trials == 60 and claims == 0


def test_stage_before_its_inputs_is_a_user_error(tmp_path):
  config = conftest.tiny_config()
  with pytest.raises(CCDDError, match="no key file"):
    pipeline.run(config, str(tmp_path), "experts")
  pipeline.run(config, str(tmp_path), "keygen")
  with pytest.raises(CCDDError, match="run --stage=experts first"):
    pipeline.run(config, str(tmp_path), "distill")
  with pytest.raises(CCDDError, match="run --stage=distill first"):
    pipeline.run(config, str(tmp_path), "evaluate")
  with pytest.raises(CCDDError, match="run --stage=evaluate first"):
    pipeline.run(config, str(tmp_path), "verify")


def run_main(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run(
    [sys.executable, "-m", "ccdd_jax.main", *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=REPO,
    timeout=300,
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "args,message",
  [
    (["--stage=verify", "--key_file=/nonexistent/owner.key"], "no key file at /nonexistent"),
    (["--config=configs/nope.py"], "nope.py"),
    (["--stage=distill"], "no key file"),
    (["--config.distill.nope=3"], "unknown field 'distill.nope' (distill has batch_syn"),
    (["--config=lenet"], "no config file 'lenet'"),
  ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
  result = run_main(f"--workdir={tmp_path / 'w'}", *args)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(error_lines) == 1 and message in error_lines[0], result.stderr


@pytest.mark.slow
def test_cli_unwritable_workdir(tmp_path):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  if os.access(locked, os.W_OK):  # Root ignores permission bits.
    target = "/proc/ccdd_not_writable"
  else:
    target = str(locked / "w")
  result = run_main(f"--workdir={target}", "--stage=keygen")
  assert result.returncode != 0 and "Traceback" not in result.stderr
  assert "workdir" in result.stderr
