"""Bad input: each case fails in one line that names the problem, exits 1, and writes nothing."""

import json
import os
import shutil
import subprocess
import sys

import conftest
import ml_collections
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.method import models
from ccdd_jax.method import watermark
from ccdd_jax.run import pipeline
from ccdd_jax.run import resume
from ccdd_jax.run import workdir as workdir_lib

REPO = conftest.REPO

# Every case starts from the tiny run (tiny_run) or runs the CLI in a child process.
pytestmark = pytest.mark.slow


def _snapshot(root):
  """Every file under `root` with its size and modification time."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      stat = os.stat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), root)] = (stat.st_size, stat.st_mtime_ns)
  return out


def _truncate_largest(directory):
  files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 3)


def _drop_manifest(w):
  (w / "manifest.json").unlink()


def _other_classes(w):
  manifest = json.loads((w / "manifest.json").read_text())
  manifest["fields"]["num_classes"] = 3
  (w / "manifest.json").write_text(json.dumps(manifest))


# name: (prepare the workdir copy, config overrides, stage, extra run kwargs, message regex)
CASES = {
  "truncated trajectory checkpoint": (
    lambda w: _truncate_largest(w / "trajectories/watermarked/0000/trajectory"),
    {},
    "distill",
    {},
    "cannot restore the trajectory of expert watermarked/0000",
  ),
  "truncated networks checkpoint": (
    lambda w: _truncate_largest(w / "models/convnet/distilled"),
    {},
    "verify",
    {},
    "cannot restore the evaluated networks at .*distilled",
  ),
  "missing watermarked experts": (
    lambda w: shutil.rmtree(w / "trajectories/watermarked"),
    {},
    "distill",
    {},
    "0 of 2 watermarked experts are finished",
  ),
  "another model (manifest)": (None, {"model.width": 4}, "distill", {}, r"model\.width \(8 -> 4\)"),
  "another model (checkpoint)": (
    _drop_manifest,
    {"model.width": 4},
    "distill",
    {},
    r"(clean|watermarked) expert 0 .* is float32\[.*8\] on disk but float32\[.*4\]",
  ),
  "image size on digits": (None, {"data.image_size": 12}, "distill", {}, "only 8x8"),
  "another key": (None, {}, "evaluate", {"key_file": "OTHER_KEY"}, r"other values of key \("),
  "a key used with another number of classes": (
    _other_classes,
    {},
    "distill",
    {},
    r"num_classes \(3 -> 10\)",
  ),
  "patch larger than the image": (
    None,
    {"watermark.patch_size": 9},
    "evaluate",
    {},
    "patch_size = 9 is larger than the 8x8 images",
  ),
  "too few patterns to verify": (
    None,
    {"watermark.n_patterns": 5},
    "verify",
    {},
    r"n_patterns = 5 with 10 classes can never be verified.*n_patterns >= 6",
  ),
  "D_W ratio 1": (None, {"watermark.ratio": 1.0}, "distill", {}, r"watermark\.ratio = 1\.0"),
  "D_W ratio 0": (None, {"watermark.ratio": 0.0}, "distill", {}, r"must be in \(0, 1\)"),
  "syn_steps 0": (None, {"distill.syn_steps": 0}, "distill", {}, r"distill\.syn_steps = 0"),
}


@pytest.fixture(scope="module")
def finished_run(tiny_run, tmp_path_factory):
  """A copy of the tiny run, so that cases may break it."""
  workdir, config, _ = tiny_run
  return workdir, config


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_in_one_line_and_writes_nothing(name, finished_run, tmp_path):
  prepare, overrides, stage, kwargs, message = CASES[name]
  source, config = finished_run
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  if prepare:
    prepare(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  for field, value in overrides.items():
    section, key = field.split(".")
    config[section][key] = value
  if kwargs.get("key_file") == "OTHER_KEY":
    kwargs = dict(kwargs, key_file=str(tmp_path / "other.key"))
    watermark.write_key_file(tmp_path / "other.key", bytes(32))
  before = _snapshot(workdir)
  with pytest.raises(CCDDError, match=message) as err:
    pipeline.run(config, str(workdir), stage, **kwargs)
  assert "\n" not in str(err.value)
  assert _snapshot(workdir) == before


def test_cli_exits_1_with_one_line_and_creates_nothing(tmp_path):
  workdir = tmp_path / "never"
  argv = [sys.executable, "-m", "ccdd_jax.main", f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  result = subprocess.run(
    argv + ["--config.distill.syn_steps=0"], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
    "error: invalid config: distill.syn_steps = 0 must be >= 1"
  ]
  assert not workdir.exists()


def test_trajectories_of_another_image_size_are_refused_before_distilling(finished_run):
  """What --stage=distill on 16x16 data would check against 8x8 experts (metadata only)."""
  workdir, config = finished_run
  like = models.build_network("convnet", 10, (16, 16, 1), config.model).like_params()
  root = workdir_lib.trajectories_dir(workdir)
  with pytest.raises(
    CCDDError, match=r"clean expert 0 .* is float32\[32, 10\] on disk but float32\[128, 10\]"
  ):
    resume.check_experts(root, ("clean",), like, 3, 2)
