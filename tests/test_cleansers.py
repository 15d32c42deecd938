"""The pirate's cleansers find planted carriers and flag by their rules (data_attacks, cleansers).

Real tiny data (scikit-learn's 8x8 digits) and width-8 networks; a "dirty-label
carrier" is a real image of one class labelled as another, as a watermark's
carrier of another class's image is.
"""

import functools

from conftest import config_section
import jax
import numpy as np
import pytest
from test_data_threats import planted_features

from ccdd_jax import CCDDError
from ccdd_jax import lists
from ccdd_jax.config import schema
from ccdd_jax.config import validation
from ccdd_jax.data import datasets
from ccdd_jax.data import preprocess
from ccdd_jax.method import models
from ccdd_jax.method import watermark
from ccdd_jax.run import reporting
from ccdd_jax.threats import cleansers
from ccdd_jax.threats import data_attacks
from ccdd_jax.threats import detection


@functools.cache
def digits():
  """The digits split and its fitted preprocessor."""
  ds = datasets.load_dataset(config_section("data"))
  return ds, preprocess.fit_preprocessor(ds.train_images)


def dirty_label_set(images, labels, per_class, carriers):
  """`per_class` clean images of each class, then `carriers` images of classes 0.. labelled
  (class + 3) mod 10. Returns images, labels and the carriers' mask."""
  clean = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
  dirty = np.array([np.flatnonzero(labels == c)[per_class + 1] for c in range(carriers)])
  set_labels = np.concatenate([labels[clean], (labels[dirty] + 3) % 10])
  carrier = np.r_[np.zeros(len(clean), bool), np.ones(carriers, bool)]
  return np.concatenate([images[clean], images[dirty]]), set_labels, carrier


def tiny_config(**attacks):
  """The schema's config with a width-8, depth-2 ConvNet, no DSA and quick SGD."""
  config = schema.base_config()
  config.model.width, config.model.depth = 8, 2
  config.dsa.strategy = "none"
  config.eval.width, config.eval.real_batch_size, config.eval.real_lr = 8, 32, 0.05
  config.attacks.update(attacks)
  return config


def random_subset_auc(scores, seed=0):
  """The AUC of a random fifth of `scores` against the rest: ~0.5 for a score blind to it."""
  pick = np.random.default_rng(seed).random(len(scores)) < 0.2
  return detection.roc_auc(scores, pick)


def test_every_cleanser_is_listed_by_default_with_a_rule_and_its_attacks():
  acfg = schema.base_config().attacks
  assert data_attacks.cleansers(acfg) == data_attacks.CLEANSERS
  assert set(data_attacks.FLAG_RULES) == set(data_attacks.CLEANSERS)
  for name in data_attacks.CLEANSERS:
    assert data_attacks.DATA_ATTACKS[f"cleanse_{name}"][1] == "data_drop_fractions"
    assert data_attacks.DATA_ATTACKS[f"flagged_{name}"][:2] == ("flagged", "data_drop_flagged")
    assert "|" not in data_attacks.FLAG_RULES[name]  # A cell of report.md's table.
  assert acfg.data_drop_flagged is True
  validation.validate(schema.base_config())


def test_spectral_and_clustering_flag_exactly_a_planted_cluster():
  feats, labels, planted = planted_features()
  spectral = data_attacks.spectral_scores(feats, labels)
  # Mean-normalised, the planted 10% sit at ~7.8 (under a plain z^2 > 9); the robust rule
  # (median square / 0.455 as the variance) puts them far out and no Gaussian image there.
  assert spectral[planted].min() < 9.0
  assert set(np.flatnonzero(data_attacks.flags("spectral", spectral, labels))) == set(planted)
  clusters = data_attacks.clustering_scores(feats, labels, dims=5)
  flagged = data_attacks.flags("clustering", clusters, labels)
  assert set(np.flatnonzero(flagged)) == set(planted)  # 4/40 <= 1/3 of class 0.
  assert 1 / 3 < np.mean(clusters[40:] > 1.0) < 1 / 2  # Class 1's smaller half: not flagged.
  assert not data_attacks.flags("spectral", np.zeros(3), np.zeros(3, int)).any()
  # Clusters of equal size: no member scores above 1 (the farthest scores exactly 1): none.
  assert not data_attacks.flags("clustering", np.array([0.2, 1.0, 0.5]), np.zeros(3, int)).any()


def test_corner_flags_stamped_corners():
  images = np.random.default_rng(0).integers(0, 40, (60, 16, 16, 1)).astype(np.uint8)
  patterns, _ = watermark.expand_key(bytes(range(32)), 3, 4, 1, 10)
  stamped = np.array([5, 20, 41])
  images[stamped] = watermark.stamp(images[stamped], patterns, np.arange(3))
  scores = data_attacks.corner_scores(images.astype(np.float32) / 255.0, 4)
  flagged = data_attacks.flags("corner", scores, np.zeros(60, int))
  assert flagged[stamped].all()
  assert flagged.sum() - len(stamped) <= 1  # z > 3 of noise corners: rare (here 1 of 57).


def test_label_rules_flag_by_probability_and_held_out_prediction():
  logits = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.45, 0.1, 0.45]]))
  labels = np.array([0, 0, 2])
  scores = data_attacks.disagreement_scores(logits, labels)
  np.testing.assert_array_equal(data_attacks.flags("disagreement", scores, labels), [0, 1, 1])
  ensemble = np.stack([logits, np.log(np.full((3, 3), 1 / 3))])  # Mean p: 0.52, 0.22, 0.39.
  scores = data_attacks.ensemble_disagreement_scores(ensemble, labels)
  np.testing.assert_allclose(scores, 1 - np.array([0.7 + 1 / 3, 0.1 + 1 / 3, 0.45 + 1 / 3]) / 2)
  flagged = data_attacks.flags("ensemble_disagreement", scores, labels)
  np.testing.assert_array_equal(flagged, [0, 1, 1])
  # Self-consistency flags a held-out image predicted as another class.
  predicted = logits.argmax(-1)
  held_out = data_attacks.disagreement_scores(logits, labels)
  flagged = data_attacks.flags("self_consistency", held_out, labels, predicted)
  np.testing.assert_array_equal(flagged, [0, 1, 1])
  with pytest.raises(ValueError, match="predictions"):
    data_attacks.flags("self_consistency", held_out, labels)
  with pytest.raises(ValueError, match="unknown cleanser"):
    data_attacks.flags("magic", held_out, labels)


def test_perturbation_statistics():
  flat = np.full((1, 6, 6, 1), 0.5)
  checker = (np.indices((6, 6)).sum(0) % 2)[None, :, :, None].astype(float)
  assert data_attacks.high_frequency_energy(flat)[0] == 0.0
  assert data_attacks.high_frequency_energy(checker)[0] > 0.1
  rng = np.random.default_rng(0)
  a, b = rng.random((7, 3, 3, 1)), rng.random((600, 3, 3, 1))
  brute = np.linalg.norm(a.reshape(7, 1, -1) - b.reshape(1, 600, -1), axis=-1).min(axis=1)
  np.testing.assert_allclose(data_attacks.nearest_distance(a, b), brute, rtol=1e-9)
  np.testing.assert_allclose(data_attacks.robust_z([3.0, 1.0], [0.0, 1.0, 2.0]), [2 / 1.4826, 0])


def test_perturbation_finds_planted_high_frequency_noise():
  ds, _ = digits()
  real = ds.attacker_images / 255.0  # The pirate's own images.
  reference = ds.train_images[:100] / 255.0  # Clean images standing in for a clean set.
  clean = ds.test_images[:60] / 255.0
  checker = (np.indices((8, 8)).sum(0) % 2 * 2 - 1)[None, :, :, None]
  perturbed = np.clip(ds.test_images[60:66] / 255.0 + 0.4 * checker, 0.0, 1.0)
  images = np.concatenate([clean, perturbed])
  carrier = np.r_[np.zeros(60, bool), np.ones(6, bool)]
  scores = data_attacks.perturbation_scores(images, real, reference)
  flagged = data_attacks.flags("perturbation", scores, None)
  assert detection.roc_auc(scores, carrier) >= 0.9
  assert flagged[carrier].all() and not flagged[~carrier].any()
  assert 0.25 < random_subset_auc(scores[~carrier]) < 0.75


def test_stratified_folds_deal_each_class_over_the_folds():
  labels = np.repeat(np.arange(4), [10, 7, 5, 3])
  folds = cleansers.stratified_folds(labels, 5, jax.random.PRNGKey(0))
  for c in range(4):
    counts = np.bincount(folds[labels == c], minlength=5)
    assert counts.max() - counts.min() <= 1, (c, counts)
  assert np.bincount(folds).max() - np.bincount(folds).min() <= 1


def test_an_ensemble_member_too_deep_for_the_images_is_a_one_line_error():
  config = tiny_config()
  net = models.build_network("convnet", 10, (8, 8, 1), config.model)
  assert cleansers.ensemble_network(config, "convnet", net, 10) is net
  with pytest.raises(CCDDError, match="attacks.data_ensemble_models: vgg11 cannot take 8x8"):
    cleansers.ensemble_network(config, "vgg11", net, 10)


@pytest.mark.slow
def test_ensemble_disagreement_finds_dirty_label_carriers():
  """A ConvNet and a ConvNet without norm layers (width 8), one of each, on 300 clean images."""
  ds, prep = digits()
  config = tiny_config(
    data_clean_model_epochs=20, data_ensemble_models="convnet,convnet:none", data_ensemble_seeds=1
  )
  net = models.build_network("convnet", 10, (8, 8, 1), config.model)
  pirate = prep.apply(ds.train_images[:300]), ds.train_labels[:300]
  members = cleansers.train_ensemble(config, net, 10, *pirate, jax.random.PRNGKey(0))
  assert [m.arch for m, _ in members] == ["convnet", "convnet:none"]
  images, labels, carrier = dirty_label_set(ds.test_images, ds.test_labels, 5, 5)
  logits = cleansers.ensemble_logits(members, prep.apply(images))
  assert logits.shape == (2, len(labels), 10)
  scores = data_attacks.ensemble_disagreement_scores(logits, labels)
  flagged = data_attacks.flags("ensemble_disagreement", scores, labels)
  assert detection.roc_auc(scores, carrier) >= 0.9
  assert flagged[carrier].all() and flagged[~carrier].mean() <= 0.1
  assert 0.25 < random_subset_auc(scores[~carrier]) < 0.75


@pytest.mark.slow
def test_self_consistency_finds_dirty_label_carriers_without_real_data():
  """5 folds of 105 images (10 per class, 5 carriers), 60 epochs each, one vmapped program."""
  ds, prep = digits()
  config = tiny_config(data_self_consistency_folds=5, data_self_consistency_epochs=60)
  config.eval.batch_size = 32
  net = models.build_network("convnet", 10, (8, 8, 1), config.model)
  images, labels, carrier = dirty_label_set(ds.train_images, ds.train_labels, 10, 5)
  held_out = cleansers.self_consistency_logits(
    config, net, prep.apply(images), labels, 0.05, jax.random.PRNGKey(1)
  )
  scores = data_attacks.disagreement_scores(held_out, labels)
  flagged = data_attacks.flags("self_consistency", scores, labels, held_out.argmax(-1))
  assert detection.roc_auc(scores, carrier) >= 0.9
  assert flagged[carrier].all() and flagged[~carrier].mean() <= 0.1
  assert 0.25 < random_subset_auc(scores[~carrier]) < 0.75


def test_the_cleansers_table_of_the_report():
  after = {"verified": 2, "networks": 3, "verdict": "survived"}
  data = {
    "trigger_slots": 9,
    "cleansers": {
      "perturbation": {
        "rule": data_attacks.FLAG_RULES["perturbation"],
        "trigger_slots_auc": 0.93,
        "flagged": 7,
        "flagged_trigger_slots": 6,
        "flagged_clean_distilled": 0,
        "after": {"top 10%": after, "top 30%": after, "flagged": {**after, "verified": 0}},
      }
    },
  }
  lines = reporting._cleansers_markdown(data)  # pylint: disable=protected-access
  assert "| verified after top 10% | verified after top 30% | verified after flagged |" in lines[3]
  assert lines[5].startswith(
    "| perturbation | 0.93 | 7 (6/9; 0) | 2/3 (survived) | 2/3 (survived) "
  )
  assert "| 0/3 (survived) | robust z > 3" in lines[5]
  assert len(lines) == 6  # No random drop measured: no chance row.
  chance = {"strength": 0.1, "verified": [True, False, False], "verdict": "removed"}
  data["points"] = {"drop_random": [chance]}
  lines = reporting._cleansers_markdown(data)  # pylint: disable=protected-access
  assert (
    lines[6] == "| drop_random (chance) | - | - | 1/3 (removed) | - | - | a uniform draw of k% |"
  )
  assert reporting._cleansers_markdown({"trigger_slots": 0}) == []  # pylint: disable=protected-access


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("data_cleansers", "perturbation,perturbation", "attacks.data_cleansers"),
    ("data_ensemble_models", "convnet,magic", "attacks.data_ensemble_models"),
    ("data_ensemble_models", "convnet,resnet18:layer", "attacks.data_ensemble_models"),
    ("data_ensemble_models", "convnet,convnet", "attacks.data_ensemble_models"),
    ("data_ensemble_models", "", "attacks.data_ensemble_models"),
    ("data_ensemble_seeds", 0, "attacks.data_ensemble_seeds"),
    ("data_self_consistency_folds", 1, "attacks.data_self_consistency_folds"),
    ("data_self_consistency_epochs", -1, "attacks.data_self_consistency_epochs"),
  ],
)
def test_bad_cleanser_settings_fail_in_one_line(field, value, message):
  config = schema.base_config()
  config.attacks[field] = value
  with pytest.raises(CCDDError, match=message) as err:
    validation.validate(config)
  assert "\n" not in str(err.value)
  assert lists.parse_list(schema.base_config().attacks.data_ensemble_models)
