"""A corrupt output of an earlier stage: one line naming the file and the stage to rerun."""

import shutil

import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.run import blackbox
from ccdd_jax.run import pipeline
from ccdd_jax.run import reporting

pytestmark = pytest.mark.slow  # Every case starts from the tiny run.


def _truncate(path, keep=0.5):
  data = path.read_bytes()
  path.write_bytes(data[: int(len(data) * keep)])


def _garble(path):
  path.write_bytes(b"\x00not what it should be\xff" * 4)


@pytest.fixture
def workdir(tiny_run, tmp_path):
  """A copy of the tiny run's workdir (the session's own stays intact)."""
  source, config, _ = tiny_run
  copy = tmp_path / "run"
  shutil.copytree(source, copy)
  return copy, config


@pytest.mark.parametrize(
  "name, damage, stage, rerun",
  [
    ("distilled.npz", _truncate, "evaluate", "--stage=distill"),
    ("clean_distilled.npz", _garble, "evaluate", "--stage=distill"),
    ("evaluation.json", _truncate, "verify", "--stage=evaluate"),
    ("evaluation.json", _garble, "attacks", "--stage=evaluate"),
  ],
)
def test_a_corrupt_input_fails_in_one_line_naming_the_file_and_the_stage(
  workdir, name, damage, stage, rerun
):
  path, config = workdir
  damage(path / name)
  with pytest.raises(CCDDError) as raised:
    pipeline.run(config, str(path), stage)
  message = str(raised.value)
  assert "\n" not in message
  assert name in message and rerun in message and "corrupt" in message, message


def test_corrupt_evaluated_networks_name_the_stage_that_rewrites_them(workdir):
  path, config = workdir
  checkpoint = path / "models" / "convnet" / "distilled"
  for file in checkpoint.rglob("*"):
    if file.is_file():
      _garble(file)
  with pytest.raises(CCDDError, match=r"corrupt.*--stage=evaluate"):
    pipeline.run(config, str(path), "verify")


def test_every_json_output_names_its_own_stage(workdir):
  path, _ = workdir
  for name, stage in [
    ("experts.json", "experts"),
    ("distill.json", "distill"),
    ("verification.json", "verify"),
  ]:
    _truncate(path / name)
    with pytest.raises(CCDDError, match=f"{name}.*--stage={stage}"):
      reporting.read_json(path / name)
  _garble(path / "timings.json")
  with pytest.raises(CCDDError, match="--fresh"):  # Bookkeeping: no stage writes it alone.
    reporting.read_json(path / "timings.json")
  (path / "report.json").write_text("[1, 2]")  # JSON, but not an object.
  with pytest.raises(CCDDError, match="report.json.*--stage=verify"):
    reporting.read_json(path / "report.json")


def test_a_truncated_queries_file_names_the_queries_stage(workdir):
  path, _ = workdir
  _truncate(path / "queries.npz")
  with pytest.raises(CCDDError, match="queries.npz.*--stage=queries"):
    blackbox.read_queries(path / "queries.npz")


def test_distilling_again_replaces_a_corrupt_set(workdir):
  """The distill stage itself reads the old sets (what evaluations were made on): a
  corrupt one is stale, not an error, and the rerun writes it whole."""
  path, config = workdir
  with np.load(path / "distilled.npz") as f:
    before = {k: f[k] for k in f.files}
  _truncate(path / "distilled.npz")
  pipeline.run(config, str(path), "distill")  # Resumes from the finished states.
  with np.load(path / "distilled.npz") as f:
    for key, value in before.items():
      np.testing.assert_array_equal(f[key], value)
  assert not (path / "evaluation.json").exists()  # Measured on the corrupt file: dropped.
