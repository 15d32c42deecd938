"""The "appended" embedding: the clean distilled set plus stamped carriers."""

import conftest
from conftest import config_section
import jax
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.config import loader as config_loader
from ccdd_jax.config import validation
from ccdd_jax.method import embedding
from ccdd_jax.method import experts
from ccdd_jax.method import models
from ccdd_jax.method import watermark
from ccdd_jax.run import checkpoints
from ccdd_jax.run import pipeline
from ccdd_jax.run import reporting
from ccdd_jax.run import workdir as workdir_lib

# conftest.tiny_config()'s sizes over the default (appended) config; 4 carriers per
# pattern make the set as large as the tiny run's, so evaluation reuses its programs.
TINY_APPENDED = (*conftest.TINY_SIZES, "distill.ipc=2", "distill.carriers_per_pattern=4")


def _clean_set(rng, num=6, classes=3):
  pixels = rng.uniform(0, 1, (num, 8, 8, 1)).astype(np.float32)
  return {"images": 2 * pixels - 1, "pixels": pixels, "labels": np.arange(num) % classes}


@pytest.mark.parametrize("source", ["train", "set"])
def test_appended_set_is_the_clean_set_plus_stamped_carriers(source):
  rng = np.random.default_rng(0)
  clean = _clean_set(rng)
  train = rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8)
  train_labels = np.arange(60) % 3
  patterns, pattern_labels = watermark.expand_key(bytes(32), 2, 4, 1, 3)
  cfg = config_section(
    "distill", watermark_embedding="appended", carriers_per_pattern=2, carrier_source=source
  )
  to_inputs = lambda u8: 2 * (u8.astype(np.float32) / 255) - 1
  images, labels, carriers = embedding.appended_set(
    cfg, clean, train, train_labels, patterns, pattern_labels, to_inputs, rng
  )
  assert images.shape == (6 + 2 * 2, 8, 8, 1) and images.dtype == np.float32
  np.testing.assert_array_equal(images[:6], clean["images"])  # The clean set, untouched.
  np.testing.assert_array_equal(labels[:6], clean["labels"])
  np.testing.assert_array_equal(carriers, np.r_[np.zeros(6, bool), np.ones(4, bool)])
  np.testing.assert_array_equal(labels[6:], np.repeat(pattern_labels, 2))
  pool, pool_labels = (train, train_labels)
  if source == "set":
    pool, pool_labels = np.round(clean["pixels"] * 255).astype(np.uint8), clean["labels"]
  for j, i in enumerate(np.repeat([0, 1], 2)):
    np.testing.assert_allclose(images[6 + j, :4, :4], to_inputs(patterns[i]), atol=1e-6)
    rest = images[6 + j, 4:]
    bases = [k for k in range(len(pool)) if np.allclose(to_inputs(pool[k, 4:]), rest)]
    assert bases and all(pool_labels[k] != pattern_labels[i] for k in bases)


def test_expert_kinds_follow_the_embedding():
  appended = config_section("distill", watermark_embedding="appended", beta=0.5)
  assert embedding.expert_kinds(appended) == embedding.expert_kinds(appended, True) == ("clean",)
  # The schema's default embedding is the shipped default's ("appended"): name the other.
  matching = config_section("distill", watermark_embedding="matching", beta=0.5)
  assert embedding.expert_kinds(matching) == experts.KINDS
  assert embedding.expert_kinds(matching, True) == experts.KINDS
  matching.beta = 0.0  # The twins are trained but not read.
  assert embedding.expert_kinds(matching, True) == ("clean", "watermarked")
  with pytest.raises(ValueError, match="start with 'clean'"):
    experts.train_kinds_resumable(None, None, None, None, None, {}, None, kinds=("watermarked",))


@pytest.mark.parametrize(
  "overrides",
  [
    ["distill.carriers_per_pattern=0"],
    ["distill.triggers_per_pattern=1"],
    ["distill.soft_labels=one_hot"],
    ["distill.watermark_embedding=stamped"],
  ],
)
def test_appended_needs_carriers_and_hard_labels(overrides):
  config = config_loader.load("digits", overrides)
  with pytest.raises(CCDDError, match="distill.watermark_embedding"):
    validation.validate(config)


@pytest.fixture(scope="module")
def appended_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("appended_run")
  watermark.write_key_file(workdir / "owner.key", conftest.TINY_KEY)
  config = config_loader.load("digits", list(TINY_APPENDED))
  report = pipeline.run(config, str(workdir), "all")
  return workdir, config, report


@pytest.mark.slow
def test_the_appended_run_trains_clean_experts_only_and_appends_its_carriers(appended_run):
  workdir, config, report = appended_run
  root = workdir_lib.trajectories_dir(workdir)
  assert [k for k in experts.KINDS if checkpoints.list_experts(root, k)] == ["clean"]
  assert set(k for k, v in report["experts"].items() if isinstance(v, dict)) == {"clean"}
  wm = workdir_lib.load_distilled(workdir, "distilled")
  clean = workdir_lib.load_distilled(workdir, "clean_distilled")
  n_clean, n_carriers = 10 * config.distill.ipc, 10 * config.distill.carriers_per_pattern
  assert len(wm["labels"]) == n_clean + n_carriers
  np.testing.assert_array_equal(wm["images"][:n_clean], clean["images"])
  np.testing.assert_array_equal(wm["labels"][:n_clean], clean["labels"])
  assert float(wm["lr"]) == float(clean["lr"])
  np.testing.assert_array_equal(wm["from_trigger"], np.arange(len(wm["labels"])) >= n_clean)
  patterns, pattern_labels = watermark.expand_key(
    watermark.read_key_file(workdir / "owner.key"), 10, 4, 1, 10
  )
  np.testing.assert_array_equal(
    wm["labels"][n_clean:], np.repeat(pattern_labels, config.distill.carriers_per_pattern)
  )
  corners = np.round(wm["pixels"][n_clean:, :4, :4] * 255).astype(np.uint8)
  np.testing.assert_array_equal(
    corners, np.repeat(patterns, config.distill.carriers_per_pattern, axis=0)
  )
  entry = reporting.read_json(workdir / "distill.json")["distilled"]
  assert entry["embedding"] == "appended" and entry["num_images"] == n_clean + n_carriers
  assert entry["trigger_visibility"]["trigger_slots"] == pytest.approx(1.0, abs=1e-3)
  assert report["distilled"]["acc"]["runs"] and len(report["distilled"]["verified"]) == 2
  # The carriers carry the watermark: every network trained on the set is verified; none
  # trained on the clean set or on real data is.
  assert report["distilled"]["verified"] == [True, True], report["distilled"]["p_values"]
  assert report["clean_distilled"]["verified"] == [False, False]
  assert report["real"]["verified"] == [False, False]


@pytest.mark.slow
def test_clean_experts_do_not_depend_on_the_kinds_trained(appended_run, tiny_run):
  """A kind's PRNG stream is its place in KINDS: clean experts trained alone (appended)
  equal those trained before the watermarked kinds (the tiny matching run)."""
  (workdir, config, _), (matching_workdir, _, _) = appended_run, tiny_run
  net = models.build(config.model.name, 10, config.model)
  like = jax.eval_shape(lambda: models.init_params(net, (8, 8, 1), jax.random.PRNGKey(0)))
  for index in range(config.experts.num_experts):
    alone, before = (
      checkpoints.restore_params(workdir_lib.trajectories_dir(w), "clean", index, 3, like)
      for w in (workdir, matching_workdir)
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, alone, before)
