"""Each attack on the distilled data, and each detector, does what it says (data_threats.py)."""

import functools
import json
import shutil

from conftest import config_section
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.config import schema
from ccdd_jax.config import validation
from ccdd_jax.data import datasets as data_lib
from ccdd_jax.data import preprocess
from ccdd_jax.method import evaluate
from ccdd_jax.method import inner_loop
from ccdd_jax.method import models
from ccdd_jax.method import watermark
from ccdd_jax.run import pipeline
from ccdd_jax.threats import data_attacks
from ccdd_jax.threats import detection as detection_lib


def test_roc_auc_on_known_inputs():
  assert detection_lib.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75  # sklearn's example.
  assert detection_lib.roc_auc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0
  assert detection_lib.roc_auc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
  assert detection_lib.roc_auc([1, 1, 1, 1], [0, 1, 0, 1]) == 0.5  # Ties count one half.
  assert detection_lib.roc_auc([1, 2, 2, 3], [0, 0, 1, 1]) == 0.875
  assert np.isnan(detection_lib.roc_auc([1, 2], [1, 1]))


def planted_features(seed=0):
  """Two classes of 40 Gaussian feature vectors; 4 of class 0 shifted far along one axis."""
  rng = np.random.default_rng(seed)
  feats = rng.normal(size=(80, 20))
  labels = np.repeat([0, 1], 40)
  planted = np.array([3, 11, 25, 37])
  feats[planted, 5] += 8.0
  return feats, labels, planted


def test_spectral_score_ranks_a_planted_outlier_cluster_highest():
  feats, labels, planted = planted_features()
  scores = data_attacks.spectral_scores(feats, labels)
  assert set(np.argsort(-scores)[:4]) == set(planted)
  assert np.isclose(scores[labels == 1].mean(), 1.0)  # Over the class mean: ~z^2.
  # Activation clustering puts exactly them in the smaller cluster of class 0.
  clusters = data_attacks.clustering_scores(feats, labels, dims=5)
  assert set(np.flatnonzero(clusters[:40] >= 1.0)) == set(planted)


def test_corner_score_ranks_stamped_images_highest():
  # Images whose corners look alike (dim noise), as a set of natural images' corners vary
  # less than a random trigger. (On 8x8 digits the 4x4 corner holds part of the digit.)
  images = np.random.default_rng(0).integers(0, 40, (60, 16, 16, 1)).astype(np.uint8)
  patterns, _ = watermark.expand_key(bytes(range(32)), 3, 4, 1, 10)
  stamped = np.array([5, 20, 41])
  images[stamped] = watermark.stamp(images[stamped], patterns, np.arange(3))
  scores = data_attacks.corner_scores(images.astype(np.float32) / 255.0, 4)
  assert set(np.argsort(-scores)[:3]) == set(stamped)


def test_disagreement_score_is_one_minus_the_label_probability():
  logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]))
  scores = data_attacks.disagreement_scores(logits + 5.0, np.array([0, 0, 2]))  # Shift-free.
  np.testing.assert_allclose(scores, [0.3, 0.9, 2 / 3])
  assert np.argmax(scores) == 1  # The image whose label the model disbelieves most.


@pytest.mark.parametrize("fraction,kept", [(0.1, 45), (0.3, 35), (0.0, 50)])
def test_cleansing_drops_exactly_k_percent_and_keeps_labels_aligned(fraction, kept):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 50)
  images = np.broadcast_to(labels[:, None, None, None], (50, 4, 4, 1)).astype(np.float32)
  scores = rng.normal(size=50)
  keep = data_attacks.cleanse(scores, fraction)
  assert len(keep) == kept and np.all(np.diff(keep) > 0)
  dropped = np.setdiff1d(np.arange(50), keep)
  assert len(dropped) == 50 - kept
  if len(dropped):
    assert scores[dropped].min() > scores[keep].max()  # The highest scores go.
  assert np.array_equal(images[keep][:, 0, 0, 0], labels[keep])  # Each image keeps its label.
  with pytest.raises(ValueError):
    data_attacks.cleanse(scores, 1.0)


def test_random_drop_is_the_keys_uniform_draw_of_k_percent():
  kept = data_attacks.random_drop(50, 0.3, jax.random.PRNGKey(0))
  assert len(kept) == 35 and np.all(np.diff(kept) > 0)
  np.testing.assert_array_equal(kept, data_attacks.random_drop(50, 0.3, jax.random.PRNGKey(0)))
  others = [data_attacks.random_drop(50, 0.3, jax.random.PRNGKey(s)) for s in range(1, 41)]
  assert not any(np.array_equal(kept, o) for o in others)
  # Over 41 keys every image is dropped about 30% of the time: no position is favoured.
  dropped = np.zeros(50)
  for o in [kept, *others]:
    dropped[np.setdiff1d(np.arange(50), o)] += 1
  assert dropped.sum() == 41 * 15 and dropped.max() <= 25 and dropped.min() >= 2
  assert len(data_attacks.random_drop(50, 0.0, jax.random.PRNGKey(0))) == 50


def test_cutout_covers_the_corner():
  images = jnp.ones((16, 8, 8, 1))
  rng = jax.random.PRNGKey(0)
  out = np.asarray(data_attacks.corner_cutout(images, rng, 4, 1.0))
  assert np.all(out[:, :4, :4] == 0) and np.all(out.sum(axis=(1, 2, 3)) == 64 - 16)
  anywhere = np.asarray(data_attacks.corner_cutout(images, rng, 4, 0.0))
  assert not np.all(anywhere[:, :4, :4] == 0)  # Elsewhere, at least sometimes.
  assert np.all(anywhere.sum(axis=(1, 2, 3)) >= 64 - 16)
  strong = data_attacks.strong_augment(
    images, rng, patch=4, corner_prob=1.0, max_shift=0, flip_prob=0.0
  )
  assert np.all(np.asarray(strong)[:, :4, :4] == 0)
  # With crop and flip the cut square moves, but it is always 16 pixels or fewer.
  moved = np.asarray(
    data_attacks.strong_augment(images, rng, patch=4, corner_prob=1.0, max_shift=1)
  )
  assert np.all(moved.sum(axis=(1, 2, 3)) <= 64 - 16 + 8)


def test_label_smoothing_targets_sum_to_one():
  labels = jnp.array([0, 3, 9])
  targets = np.asarray(inner_loop.smooth_targets(labels, 10, 0.2))
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(targets[1, 3], 0.8 + 0.02, rtol=1e-6)
  np.testing.assert_allclose(targets[1, 0], 0.02, rtol=1e-6)
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 10))
  manual = -np.mean(np.sum(targets * np.asarray(jax.nn.log_softmax(logits)), axis=1))
  np.testing.assert_allclose(inner_loop.cross_entropy(logits, labels, 0.2), manual, rtol=1e-5)
  assert np.isclose(
    inner_loop.cross_entropy(logits, labels, 0.0),
    -np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(3), labels]),
  )


def test_parameter_detection_tells_apart_what_differs():
  rng = np.random.default_rng(0)
  wide = {
    "conv": {"kernel": rng.normal(0, 2.0, (8, 50))},
    "head": {"kernel": rng.normal(size=(8, 30))},
  }
  narrow = {
    "conv": {"kernel": rng.normal(0, 1.0, (8, 50))},
    "head": {"kernel": rng.normal(size=(8, 30))},
  }
  names, values = detection_lib.parameter_statistics(wide)
  assert values.shape == (8, 8) and "conv/kernel:std" in names
  result = detection_lib.parameter_detection(wide, narrow)
  assert result["auc"] == 1.0 and result["min_p_mannwhitney"] < 1e-3
  assert result["most_different_statistic"] in ("conv/kernel:std", "conv/kernel:l2")
  same = {
    "conv": {"kernel": rng.normal(0, 1.0, (8, 50))},
    "head": {"kernel": rng.normal(size=(8, 30))},
  }
  assert detection_lib.parameter_detection(same, narrow)["bonferroni_p_mannwhitney"] > 0.05


def test_anomaly_index():
  index, smallest = detection_lib.anomaly_index([10, 11, 9, 10, 12, 2])
  assert smallest == 5 and index > 2
  assert detection_lib.anomaly_index([10, 11, 9, 10, 12, 8])[0] < 2


@pytest.mark.slow
def test_neural_cleanse_finds_a_planted_trigger():
  """A tiny digits network learns "white 2x2 top-left square -> 0"; Neural Cleanse finds class 0
  with a small mask on that corner, and its MAD anomaly index flags it.

  A 3x3 square sat too close to the threshold: its index was 1.6-3.3 over training seeds and
  CPUs (1.84 on an AVX-512 machine); a 2x2 one gives 3.3-6.6 over four seeds at 100 steps."""
  ds = data_lib.load_digits(0.2, 0)
  prep = preprocess.fit_preprocessor(ds.train_images)
  rng = np.random.default_rng(0)
  poisoned = rng.choice(len(ds.train_labels), 300, replace=False)
  images, labels = ds.train_images.copy(), ds.train_labels.copy()
  images[poisoned, :2, :2] = 255
  labels[poisoned] = 0
  net = models.build_network("convnet", 10, (8, 8, 1), config_section("model", width=8, depth=2))
  train = evaluate.make_networks_trainer(
    net.apply, config_section("dsa", strategy="none"), epochs=20, batch_size=64
  )
  params = jax.device_get(
    train(
      net.init_params(jax.random.PRNGKey(0), 1),
      prep.apply(images),
      labels,
      0.05,
      jax.random.PRNGKey(1),
    )
  )
  clean = ds.test_images[ds.test_labels != 0][:48].astype(np.float32) / 255.0
  result = detection_lib.neural_cleanse(
    net.apply,
    params,
    clean,
    functools.partial(prep.pixels_to_inputs, xp=jnp),
    10,
    jax.random.PRNGKey(2),
    steps=100,
  )
  norms, mask = result["norms"][0], result["masks"][0, 0, ..., 0]
  assert int(np.argmin(norms)) == 0, norms
  assert mask[:2, :2].sum() > 0.5 * mask.sum(), mask.round(2)
  assert result["anomaly_index"][0] > detection_lib.ANOMALY_THRESHOLD, norms
  masks = np.zeros((1, 2, 8, 8, 1))
  masks[0, 0, :3, :3] = 1.0  # All on the corner ...
  masks[0, 1, 4:, 4:] = 1.0  # ... none on it.
  assert np.allclose(detection_lib.corner_mass(masks, 4), 0.5)


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("data_cleansers", "spectral,magic", "attacks.data_cleansers"),
    ("data_drop_fractions", "0.1,1.0", "attacks.data_drop_fractions"),
    ("data_label_smoothing", "x", "attacks.data_label_smoothing"),
    ("data_strong_augment", "1.5", "attacks.data_strong_augment"),
    ("data_nc_steps", 0, "attacks.data_nc_steps"),
    ("data_nc_success", 0.0, "attacks.data_nc_success"),
  ],
)
def test_bad_data_threat_settings_fail_in_one_line(field, value, message):
  config = schema.base_config()
  config.attacks[field] = value
  with pytest.raises(CCDDError, match=message):
    validation.validate(config)


@pytest.mark.slow
def test_data_threats_stage_end_to_end_and_the_key_stays_secret(tiny_run, tmp_path, capfd):
  workdir, config, _ = tiny_run
  run = tmp_path / "data_attacked"
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("trajectories"))
  config = ml_collections.ConfigDict(config.to_dict())
  a = config.attacks
  for name in ("fine_tune_epochs", "prune_ratios", "fine_prune_ratios", "overwrite_epochs"):
    a[name] = ""
  a.extraction_epochs, a.jpeg_qualities, a.blur_sigmas, a.resize_factors = "", "", "", ""
  # Label smoothing is a loss change (test_label_smoothing_targets_sum_to_one): skipped here,
  # as one more compiled trainer.
  a.sets, a.data_drop_fractions, a.data_label_smoothing = "distilled", "0.3", ""
  a.data_clean_model_epochs, a.data_nc_steps, a.data_nc_images = 2, 3, 16
  # Two cheap ensemble members and short fold models: test_cleansers.py covers the cleansers.
  a.data_ensemble_models, a.data_ensemble_seeds = "convnet,convnet:none", 1
  a.data_self_consistency_epochs = 20
  capfd.readouterr()
  pipeline.run(config, str(run), "attacks")
  out, err = capfd.readouterr()
  data = json.loads((run / "attacks.json").read_text())["data"]
  assert (run / "attacks_data.png").stat().st_size > 0
  assert set(data["points"]) == set(data_attacks.DATA_ATTACKS) - {"label_smoothing"}
  # Unattacked, every network of the distilled set is verified (the tiny run's verdict), so
  # every attacked point is judged: none is "n/a".
  assert data["before"]["verified"] == [True] * config.eval.num_seeds, data["before"]
  for name, entries in data["points"].items():
    for e in entries:
      assert len(e["verified"]) == config.eval.num_seeds
      assert e["verdict"] in ("removed", "survived", "destroyed"), (name, e)
  assert data["points"]["cleanse_corner"][0]["dropped"] == round(0.3 * data["num_images"])
  assert data["points"]["drop_random"][0]["dropped"] == round(0.3 * data["num_images"])
  detection = data["detection"]
  assert set(detection["data"]) == {*data_attacks.CLEANSERS, "trigger_visibility"}
  assert data["points"]["cleanse_disagreement"][0]["dropped"] == round(0.3 * data["num_images"])
  for name in ("auc", "auc_median_norm", "auc_corner_mass"):
    assert 0.0 <= detection["neural_cleanse"][name] <= 1.0
  assert 0.0 <= detection["parameters"]["auc"] <= 1.0
  markdown = (run / "report.md").read_text()
  assert "| cleanse_spectral | fraction 0.3 |" in markdown
  assert "| Neural Cleanse anomaly index |" in markdown
  assert "[attacks] data detection, Neural Cleanse" in err
  key = watermark.read_key_file(run / "owner.key")
  needles = [key, key.hex().encode(), key.hex().upper().encode()]
  for path in run.rglob("*"):
    if path.is_file() and path.name != "owner.key":
      assert not any(n in path.read_bytes() for n in needles), path
  for text in (out, err):
    assert not any(n.decode("latin-1") in text for n in needles[1:]) and repr(key) not in text
