"""Attacks on, and detection of, the distilled data itself: what a pirate who holds the
watermarked distilled set (not a model) tries, and what a defender can tell.

Every function is pure: (config, arrays, rng) in, arrays or a dict out; `run`
strings them together for `--stage=attacks` (attacks.json's "data" section).
The pirate's view never includes the key: the cleansing scores below use the
images, their labels and a clean model of the pirate's own, trained on its
held-out clean data (`data.attacker_fraction`, as threats.py's attacks). The
owner then verifies the networks trained on what is left with the key
(threats.Verifier, threats.judge: "removed" only with Acc down < 5 points).

  Dataset cleansing: each distilled image gets an outlier score and the top
  k% are dropped (`cleanse`), and each cleanser's rule drops exactly the
  images it flags (data_attacks.FLAG_RULES; strength = how many); then fresh
  networks train on the rest with evaluate.py's trainer (the learned lr,
  eval.epochs, the run's DSA). The scores (cleansers.score_sets):
    spectral     spectral signatures (Tran, Li, Madry 2018, "Spectral
                 Signatures in Backdoor Attacks"): per class, the squared
                 projection of the centred features of a clean model on their
                 top singular vector (over its class mean: ~z^2).
    clustering   activation clustering (Chen et al. 2018, "Detecting Backdoor
                 Attacks on Deep Neural Networks by Activation Clustering"):
                 per class, features reduced by PCA (the paper uses ICA) and
                 split by 2-means; members of the smaller cluster first, then
                 by distance to the larger cluster's centre.
    corner       what the pirate can see of a corner trigger without the key:
                 how far an image's top-left patch differs from the set's
                 typical (median) corner, over the set's RMS of that distance.
    disagreement label noise as a backdoor's tell: 1 - the pirate's clean
                 model's probability of the image's own label (a stamped
                 carrier of another class's image scores high).
    ensemble_disagreement  the same over an ensemble of clean models of
                 several architectures (attacks.data_ensemble_models).
    self_consistency  without real data: each image scored by a model trained
                 on the set's other k-1 folds.
    perturbation high-frequency energy and distance to the nearest real image,
                 robust z-scores against clean distilled images (the run's
                 clean set, as a proxy for one the pirate distils itself).
  Robust training: the same trainer with label smoothing (Szegedy et al.
  2016), or with strong augmentation on every batch (cutout of a patch-sized
  square that lands on the top-left corner with probability `corner_prob`,
  random crop, horizontal flip), on top of the run's DSA.
  Detection, each as a ROC AUC (`roc_auc`):
    parameters   per-layer parameter statistics (mean, std, kurtosis, L2
                 norm) of networks trained on the watermarked vs the clean
                 distilled set: two-sample tests per statistic (Mann-Whitney
                 U, Kolmogorov-Smirnov; Bonferroni) and the AUC of a
                 reference-distance score (the paper's "parameter
                 distribution" argument, measured).
    neural cleanse  trigger reverse engineering (Wang et al. 2019, "Neural
                 Cleanse: Identifying and Mitigating Backdoor Attacks in
                 Neural Networks"): per class the smallest mask (L1) with a
                 pattern that flips clean inputs to it, and the MAD anomaly
                 index of the smallest class (> 2 flags a backdoor).
    data         the cleansing scores as detectors of the watermark-carrying
                 slots (`from_trigger`) among the set's images, and of the
                 watermarked set's images against the clean distilled set's.
"""

from collections.abc import Callable, Mapping
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ccdd_jax.log import log
from ccdd_jax.method import evaluate
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.threats import cleansers
from ccdd_jax.threats import data_attacks
from ccdd_jax.threats import detection
from ccdd_jax.threats import suite

# ----------------------------------------------------------------------------
# Scores of each image (what the pirate sees: images, labels, its own model).
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Robust training.
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Detection on models.
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# The suite (attacks.json's "data" section).
# ----------------------------------------------------------------------------


def _fmt_auc(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}"


def _pirate_model(config, network, verifier, attacker, key: jax.Array) -> tuple[Any, dict]:
  """The pirate's clean model: one network on its held-out data (eval.real_* recipe)."""
  acfg, ecfg, tick = config.attacks, config.eval, time.time()
  images, labels = attacker
  trainer = cleansers.clean_model_trainer(config, network.apply)
  init = network.init_params(jax.random.fold_in(key, 0), 1)
  stacked = jax.device_get(
    trainer(init, verifier.to_inputs(images), labels, ecfg.real_lr, jax.random.fold_in(key, 1))
  )
  predictions = verifier.predict(stacked, verifier.to_inputs(verifier.test_images))[0]
  summary = {
    "images": len(labels),
    "epochs": acfg.data_clean_model_epochs,
    "acc": float(np.mean(predictions == verifier.test_labels)),
    "seconds": time.time() - tick,
  }
  log(
    f"[attacks] data: the pirate's clean model ({len(labels)} images of its own): "
    f"Acc {100 * summary['acc']:.1f}%"
  )
  return jax.tree_util.tree_map(lambda x: x[0], stacked), summary


def _trainer(config, network, patch: int, wm: dict, init, train_rng) -> Callable:
  """`train(keep, smoothing=0, corner_prob=None) -> stacked params` on `wm`'s images `keep`
  with the evaluation's recipe (one compiled trainer per shape and change, one training per
  kept set without a change). Nothing kept: the untrained `init` (no data, no training)."""
  acfg, ecfg = config.attacks, config.eval
  trainers, trained = {}, {}

  def train(keep, smoothing=0.0, corner_prob=None):
    spec = (len(keep), smoothing, corner_prob)
    if not len(keep):
      return init
    if spec not in trainers:
      extra = None
      if corner_prob is not None:
        shift = int(wm["images"].shape[1] * acfg.data_crop_ratio + 0.5)
        extra = functools.partial(
          data_attacks.strong_augment, patch=patch, corner_prob=corner_prob, max_shift=shift
        )
      trainers[spec] = evaluate.make_networks_trainer(
        network.apply,
        config.dsa,
        epochs=ecfg.epochs,
        batch_size=ecfg.batch_size,
        momentum=ecfg.momentum,
        weight_decay=ecfg.weight_decay,
        label_smoothing=smoothing,
        extra_augment=extra,
      )
    cache_key = (np.asarray(keep).tobytes(), smoothing, corner_prob)
    if cache_key not in trained:
      images, labels, lr = wm["images"][keep], wm["labels"][keep], float(wm["lr"])
      trained[cache_key] = jax.device_get(trainers[spec](init, images, labels, lr, train_rng))
    return trained[cache_key]

  return train


def _attack_points(
  config, network, verifier, wm, scores, flags, init, train_rng, before, drop_key
) -> dict:
  """Every data attack at every strength: {name: [measured points]} (threats.measured_point).

  Cleansing drops each cleanser's top k% and (attacks.data_drop_flagged) exactly
  the images its rule flags (strength: how many); a flag rule that flags nothing
  leaves the unattacked networks (`before`), one that flags everything untrained ones.
  `drop_random` drops k% drawn by `drop_key` folded with the fraction's position.
  """
  acfg, n = config.attacks, len(wm["labels"])
  from_trigger = np.asarray(wm["from_trigger"], bool)
  train = _trainer(config, network, verifier.patch_size, wm, init, train_rng)
  points = {}

  def record(name, value, measured, tick, **extra):
    point = suite.measured_point(value, measured, before, time.time() - tick)
    points.setdefault(name, []).append({**point, **extra})
    slots = f", trigger slots dropped {extra['trigger_slots_dropped']}" if extra else ""
    log(
      f"[attacks] data {name} {data_attacks.DATA_ATTACKS[name][0]}={value:g}: Acc "
      f"{100 * point['acc']['mean']:.1f}% ({-100 * point['acc_drop']:+.1f}) Acc_W "
      f"{100 * point['acc_w']['mean']:.1f}%, verified {sum(point['verified'])}/"
      f"{len(point['verified'])}{slots}: {point['verdict']}"
    )

  drops = []
  for cleanser in data_attacks.cleansers(acfg):
    drops += [
      (
        f"cleanse_{cleanser}",
        f,
        np.setdiff1d(np.arange(n), data_attacks.cleanse(scores[cleanser], f)),
      )
      for f in data_attacks.strengths(acfg, f"cleanse_{cleanser}")
    ]
    if acfg.data_drop_flagged:
      flagged = np.flatnonzero(flags[cleanser])
      drops.append((f"flagged_{cleanser}", len(flagged), flagged))
  for i, f in enumerate(data_attacks.strengths(acfg, "drop_random")):
    kept = data_attacks.random_drop(n, f, jax.random.fold_in(drop_key, i))
    drops.append(("drop_random", f, np.setdiff1d(np.arange(n), kept)))
  for name, value, dropped in drops:
    tick = time.time()
    keep = np.setdiff1d(np.arange(n), dropped)
    measured = verifier.measure(train(keep)) if len(dropped) else before
    slots = int(from_trigger[dropped].sum())
    record(name, value, measured, tick, dropped=len(dropped), trigger_slots_dropped=slots)
  everything = np.arange(n)
  for smoothing in data_attacks.strengths(acfg, "label_smoothing"):
    tick = time.time()
    record("label_smoothing", smoothing, verifier.measure(train(everything, smoothing)), tick)
  # On 8x8 digits the 4x4 trigger corner is a quarter of the image: a corner
  # cutout, crop and flip on every batch may destroy accuracy (an earlier
  # measurement: 46% Acc), which the verdict then counts as "destroyed".
  for corner_prob in data_attacks.strengths(acfg, "strong_augment"):
    tick = time.time()
    params = train(everything, corner_prob=corner_prob)
    record("strong_augment", corner_prob, verifier.measure(params), tick)
  return points


def _detect(config, network, verifier, preprocessor, sets, networks, scores, pixels, key):
  """The detectors: parameter statistics, Neural Cleanse, and the data scores (AUCs)."""
  detected = {
    "parameters": detection.parameter_detection(networks["distilled"], networks["clean_distilled"])
  }
  d = detected["parameters"]
  log(
    f"[attacks] data detection, parameter statistics: AUC {d['auc']:.2f}, smallest "
    f"Mann-Whitney p {d['min_p_mannwhitney']:.3g} of {d['n_statistics']} (Bonferroni "
    f"{d['bonferroni_p_mannwhitney']:.3g})"
  )
  to_inputs = functools.partial(preprocessor.pixels_to_inputs, xp=jnp)
  args = (config.attacks, network, verifier, networks, pixels, to_inputs, key)
  detected["neural_cleanse"] = _neural_cleanse(*args)
  detected["data"] = _data_scores(verifier, sets, scores)
  return detected


def _neural_cleanse(acfg, network, verifier, networks, pixels, to_inputs, key) -> dict:
  """Neural Cleanse on the networks of both distilled sets: the AUCs of three scores."""
  nc = {
    name: detection.neural_cleanse(
      network.apply,
      networks[name],
      pixels,
      to_inputs,
      verifier.num_classes,
      key,
      steps=acfg.data_nc_steps,
      lr=acfg.data_nc_lr,
      lam=acfg.data_nc_lambda,
      success=acfg.data_nc_success,
    )
    for name in ("distilled", "clean_distilled")
  }
  a_wm, a_clean = nc["distilled"]["anomaly_index"], nc["clean_distilled"]["anomaly_index"]
  negatives_then_positives = np.r_[np.zeros(len(a_clean), bool), np.ones(len(a_wm), bool)]
  # Beyond the MAD criterion (one target class): a CCDD key sends its n patterns
  # to several classes, so its networks may have small masks for many classes
  # (a smaller median norm) or masks drawn to the trigger corner (public: where
  # the method stamps). Both scores need clean reference networks to threshold.
  median = {n: -np.median(r["norms"], axis=1) for n, r in nc.items()}
  corner = {n: detection.corner_mass(r["masks"], verifier.patch_size) for n, r in nc.items()}
  result = {
    "auc": detection.roc_auc(np.r_[a_clean, a_wm], negatives_then_positives),
    "auc_median_norm": detection.roc_auc(
      np.r_[median["clean_distilled"], median["distilled"]], negatives_then_positives
    ),
    "auc_corner_mass": detection.roc_auc(
      np.r_[corner["clean_distilled"], corner["distilled"]], negatives_then_positives
    ),
    "threshold": detection.ANOMALY_THRESHOLD,
    "images": len(pixels),
    "steps": acfg.data_nc_steps,
    **{
      name: {
        "anomaly_index": r["anomaly_index"].tolist(),
        "flagged": int(np.sum(r["anomaly_index"] > detection.ANOMALY_THRESHOLD)),
        "smallest_class": r["flagged_class"].tolist(),
        "norms": r["norms"].tolist(),
        "corner_mass": corner[name].tolist(),
      }
      for name, r in nc.items()
    },
  }
  log(
    f"[attacks] data detection, Neural Cleanse: AUC {result['auc']:.2f} (anomaly index), "
    f"{result['auc_median_norm']:.2f} (median mask norm), {result['auc_corner_mass']:.2f} "
    f"(corner mass); anomaly index > {detection.ANOMALY_THRESHOLD:g} in "
    f"{result['distilled']['flagged']}/{len(a_wm)} watermarked-set and "
    f"{result['clean_distilled']['flagged']}/{len(a_clean)} clean-set networks"
  )
  return result


def _data_scores(verifier, sets, scores) -> dict:
  """Each cleansing score, and the key's trigger visibility, as a detector (AUCs)."""
  wm, clean = sets["distilled"], sets["clean_distilled"]
  # The owner's own view (the key's patterns): a reference, not a pirate's option.
  patterns, _ = watermark.expand_key(
    verifier.key,
    verifier.n_patterns,
    verifier.patch_size,
    wm["pixels"].shape[-1],
    verifier.num_classes,
  )
  scores = {
    **scores,
    "trigger_visibility": {
      n: watermark.trigger_visibility(s["pixels"], patterns)
      for n, s in (("distilled", wm), ("clean_distilled", clean))
    },
  }
  result = {}
  from_trigger = np.asarray(wm["from_trigger"], bool)
  for name, by_set in scores.items():
    on_wm, on_clean = by_set["distilled"], by_set["clean_distilled"]
    set_labels = np.r_[np.zeros(len(on_clean), bool), np.ones(len(on_wm), bool)]
    e = result[name] = {
      "trigger_slots_auc": detection.finite(detection.roc_auc(on_wm, from_trigger)),
      "set_auc": detection.finite(detection.roc_auc(np.r_[on_clean, on_wm], set_labels)),
      "uses_key": name == "trigger_visibility",
    }
    log(
      f"[attacks] data detection, {name} scores: AUC {_fmt_auc(e['trigger_slots_auc'])} for "
      f"trigger slots, {_fmt_auc(e['set_auc'])} for watermarked vs clean set images"
    )
  return result


def _cleanser_summary(acfg, result: dict, flags: dict, from_trigger: np.ndarray) -> dict:
  """Per cleanser: its flag rule, the trigger slots' ROC AUC, what it flags on the distilled
  set, and the verified networks and verdict after each of its drops (attacks.json)."""
  table = {}
  for cleanser in data_attacks.cleansers(acfg):
    flagged = np.asarray(flags[cleanser]["distilled"], bool)
    entry = table[cleanser] = {
      "rule": data_attacks.FLAG_RULES[cleanser],
      "trigger_slots_auc": result["detection"]["data"][cleanser]["trigger_slots_auc"],
      "flagged": int(flagged.sum()),
      "flagged_trigger_slots": int((flagged & from_trigger).sum()),
      "flagged_clean_distilled": int(np.sum(flags[cleanser]["clean_distilled"])),
      "after": {},
    }
    for kind in ("cleanse", "flagged"):
      for e in result["points"].get(f"{kind}_{cleanser}", []):
        drop = "flagged" if kind == "flagged" else f"top {100 * e['strength']:g}%"
        entry["after"][drop] = {
          "verified": int(sum(e["verified"])),
          "networks": len(e["verified"]),
          "verdict": e["verdict"],
        }
    log(
      f"[attacks] data {cleanser}: flags {entry['flagged']} images "
      f"({entry['flagged_trigger_slots']}/{int(from_trigger.sum())} trigger slots; "
      f"{entry['flagged_clean_distilled']} of the clean distilled set); rule: {entry['rule']}"
    )
  return table


def run(
  config,
  *,
  network,
  verifier: verify.Verifier,
  preprocessor,
  sets: Mapping[str, dict],
  networks: Mapping[str, Any],
  attacker: tuple[np.ndarray, np.ndarray],
  init_params: Any,
  train_rng: jax.Array,
  rng: np.random.Generator,
) -> dict:
  """The data threats on `sets["distilled"]` (against `sets["clean_distilled"]`):
  attacks.json's "data" section.

  `sets` hold the distilled sets as workdir.load_distilled reads them;
  `networks` the networks evaluate trained on each (the unattacked ones);
  `init_params` and `train_rng` are evaluate's, so that the attacked networks
  start where the unattacked ones did; `network` has `apply` and
  `init_params`; `preprocessor` maps pixels to inputs (Neural Cleanse);
  `attacker` is the pirate's uint8 images and labels; `rng` draws the rest.
  """
  acfg, start = config.attacks, time.time()
  wm = sets["distilled"]
  count = acfg.num_seeds or jax.tree_util.tree_leaves(networks["distilled"])[0].shape[0]
  first = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x[:count]), tree)
  before = verifier.measure(first(networks["distilled"]))
  from_trigger = np.asarray(wm["from_trigger"], bool)
  result = {
    "set": "distilled",
    "num_images": len(wm["labels"]),
    "trigger_slots": int(from_trigger.sum()),
    "attacks": {
      n: {"strength": s, "description": d} for n, (s, _, d) in data_attacks.DATA_ATTACKS.items()
    },
    "before": {**suite.measured_point(None, before, before, 0.0), "verdict": "unattacked"},
  }
  log(
    f"[attacks] data: {len(wm['labels'])} distilled images ({int(from_trigger.sum())} trigger "
    f"slots), {count} networks per point"
  )
  key = jax.random.PRNGKey(int(rng.integers(2**31)))
  pirate, result["clean_model"] = _pirate_model(config, network, verifier, attacker, key)
  # scores[cleanser][set name]: [N]; flags likewise (data_attacks.flags).
  scores, flags, result["cleanser_models"] = cleansers.score_sets(
    config, network, verifier, sets, attacker, pirate, jax.random.fold_in(key, 3)
  )
  result["points"] = _attack_points(
    config,
    network,
    verifier,
    wm,
    {c: by_set["distilled"] for c, by_set in scores.items()},
    {c: by_set["distilled"] for c, by_set in flags.items()},
    first(init_params),
    train_rng,
    before,
    jax.random.fold_in(key, 4),
  )
  tick = time.time()
  images = attacker[0]
  pick = rng.choice(len(images), min(acfg.data_nc_images, len(images)), replace=False)
  pixels = images[pick].astype(np.float32) / 255.0
  result["detection"] = _detect(
    config,
    network,
    verifier,
    preprocessor,
    sets,
    networks,
    scores,
    pixels,
    jax.random.fold_in(key, 2),
  )
  result["detection"]["seconds"] = time.time() - tick
  result["cleansers"] = _cleanser_summary(acfg, result, flags, from_trigger)
  result["seconds"] = time.time() - start
  return result
