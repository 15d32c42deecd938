"""The models the cleansers train, and every cleanser's scores and flags of the distilled sets.

data_attacks holds the scores and the flag rules (pure functions); this module
trains what they need beyond the pirate's clean model (data_suite._pirate_model):

  ensemble_disagreement  clean models of each architecture of
      `attacks.data_ensemble_models`, `data_ensemble_seeds` of each, on the
      pirate's held-out data (`data.attacker_fraction`) with the clean model's
      recipe (eval.real_* and `data_clean_model_epochs`): the run's model as it
      is, the others at eval.width (ENSEMBLE_WIDTH where that is 0).
  self_consistency  no real data: k = `data_self_consistency_folds` models on a
      class-stratified k-fold split of the set itself, with the evaluation's
      recipe (evaluate.make_set_trainer, what make_networks_trainer vmaps:
      eval.*, the set's learned lr, `data_self_consistency_epochs` or
      eval.epochs), all folds in one vmapped program; each image is scored by
      the model of the fold that held it out.
  perturbation  its reference of clean distilled images is the run's clean
      distilled set (clean_distilled.npz): a proxy for a set the pirate
      distils itself from its own data with public MTT code (no key, no
      watermark), which this stage does not run. With the "appended" embedding
      the watermarked set's non-carrier images are that very set, so there the
      proxy is kinder to the pirate than a set of its own would be.
"""

from collections.abc import Callable
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax import lists
from ccdd_jax.log import log
from ccdd_jax.method import evaluate
from ccdd_jax.method import models
from ccdd_jax.threats import data_attacks

ENSEMBLE_WIDTH = 16  # Width of an ensemble's other architectures where eval.width is 0.


@functools.partial(jax.jit, static_argnums=0)
def _stacked_logits(apply_fn, stacked, inputs):
  return jax.vmap(apply_fn, in_axes=(0, None))(stacked, inputs)


def stacked_logits(apply_fn: Callable, stacked: Any, inputs: np.ndarray) -> np.ndarray:
  """The logits [S, N, K] of S stacked networks, in chunks of 512 inputs."""
  chunks = [
    np.asarray(_stacked_logits(apply_fn, stacked, jnp.asarray(inputs[s : s + 512])))
    for s in range(0, len(inputs), 512)
  ]
  return np.concatenate(chunks, axis=1)


def ensemble_network(config, arch: str, network: models.Network, num_classes: int):
  """The ensemble's member `arch`: `network` itself where it names the run's model."""
  if arch == network.arch:
    return network
  width = config.eval.width or ENSEMBLE_WIDTH
  net = models.build_network(arch, num_classes, network.image_shape, config.model, width)
  try:
    net.like_params()
  except (ArithmeticError, ValueError, TypeError) as err:
    size = "x".join(map(str, network.image_shape[:2]))
    raise CCDDError(
      f"attacks.data_ensemble_models: {arch} cannot take {size} images "
      f"({type(err).__name__}: {err}); use another architecture"
    ) from None
  return net


def clean_model_trainer(config, apply: Callable) -> Callable:
  """The trainer of the pirate's clean models on its own data (eval.real_* batch, the attacks'
  data_clean_model_epochs): its single model and each ensemble member."""
  acfg, ecfg = config.attacks, config.eval
  return evaluate.make_networks_trainer(
    apply,
    config.dsa,
    epochs=acfg.data_clean_model_epochs,
    batch_size=ecfg.real_batch_size,
    momentum=ecfg.momentum,
    weight_decay=ecfg.weight_decay,
  )


def train_ensemble(config, network, num_classes: int, inputs, labels, key) -> list[tuple]:
  """The pirate's clean ensemble on its data (`inputs`, `labels`): [(Network, stacked params)],
  `attacks.data_ensemble_seeds` networks of each architecture of `data_ensemble_models`."""
  acfg, ecfg = config.attacks, config.eval
  members = []
  for i, arch in enumerate(lists.parse_list(acfg.data_ensemble_models)):
    net = ensemble_network(config, arch, network, num_classes)
    trainer = clean_model_trainer(config, net.apply)
    member_key = jax.random.fold_in(key, i)
    init = net.init_params(jax.random.fold_in(member_key, 0), acfg.data_ensemble_seeds)
    rng = jax.random.fold_in(member_key, 1)
    members.append((net, jax.device_get(trainer(init, inputs, labels, ecfg.real_lr, rng))))
  return members


def ensemble_logits(members: list[tuple], inputs: np.ndarray) -> np.ndarray:
  """Every member network's logits of `inputs`: [M, N, K] (M = architectures x seeds)."""
  return np.concatenate([stacked_logits(net.apply, params, inputs) for net, params in members])


def stratified_folds(labels: np.ndarray, k: int, key: jax.Array) -> np.ndarray:
  """Each image's fold in [0, k): each class dealt round-robin over the folds in random order."""
  labels = np.asarray(labels)
  order = np.lexsort((np.asarray(jax.random.uniform(key, (len(labels),))), labels))
  folds = np.empty(len(labels), np.int64)
  folds[order] = np.arange(len(labels)) % k
  return folds


def self_consistency_logits(config, network, images, labels, lr: float, key) -> np.ndarray:
  """Each image's logits [N, K] by the model of the k-fold split that held it out.

  The k models train on the other folds (one vmapped program; a shorter
  complement repeats its first image so that every fold has the same shape).
  """
  acfg, ecfg = config.attacks, config.eval
  labels = np.asarray(labels)
  k = min(acfg.data_self_consistency_folds, len(labels))
  if k < 2:
    raise ValueError(f"self-consistency needs 2 images or more, got {len(labels)}")
  key_split, key_init, key_train, key_family = jax.random.split(key, 4)
  folds = stratified_folds(labels, k, key_split)
  size = len(labels) - int(np.bincount(folds, minlength=k).min())
  index = np.stack([np.resize(np.flatnonzero(folds != f), size) for f in range(k)])
  set_trainer = evaluate.make_set_trainer(
    network.apply,
    config.dsa,
    epochs=acfg.data_self_consistency_epochs or ecfg.epochs,
    batch_size=ecfg.batch_size,
    momentum=ecfg.momentum,
    weight_decay=ecfg.weight_decay,
  )
  train = jax.jit(jax.vmap(set_trainer, in_axes=(0, 0, 0, None, 0, None)))
  images = np.asarray(images)
  params = train(
    network.init_params(key_init, k),
    jnp.asarray(images[index]),
    jnp.asarray(labels[index], jnp.int32),
    jnp.float32(lr),
    jax.random.split(key_train, k),
    key_family,
  )
  logits = stacked_logits(network.apply, jax.device_get(params), images)
  return logits[folds, np.arange(len(labels))]


def _ensemble_summary(members, verifier, seconds: float) -> dict:
  """Each ensemble architecture's test accuracy per seed (attacks.json)."""
  test = verifier.to_inputs(verifier.test_images)
  archs = []
  for net, params in members:
    acc = np.mean(stacked_logits(net.apply, params, test).argmax(-1) == verifier.test_labels, 1)
    archs.append({"arch": net.arch, "acc": acc.tolist()})
    log(
      f"[attacks] data: the pirate's ensemble, {net.arch} x {len(acc)}: Acc {100 * acc.mean():.1f}%"
    )
  return {"members": archs, "seconds": seconds}


def _self_consistency(config, network, name: str, s: dict, key) -> tuple[np.ndarray, dict]:
  """`self_consistency_logits` of set `name` (`s`: its arrays), and a summary of the folds."""
  acfg, tick = config.attacks, time.time()
  held_out = self_consistency_logits(config, network, s["images"], s["labels"], float(s["lr"]), key)
  entry = {
    "folds": min(acfg.data_self_consistency_folds, len(s["labels"])),
    "epochs": acfg.data_self_consistency_epochs or config.eval.epochs,
    "held_out_acc": float(np.mean(held_out.argmax(-1) == s["labels"])),
    "seconds": time.time() - tick,
  }
  log(
    f"[attacks] data: self-consistency of {name}: {entry['folds']} folds x {entry['epochs']} "
    f"epochs, held-out Acc {100 * entry['held_out_acc']:.1f}% ({entry['seconds']:.0f} s)"
  )
  return held_out, entry


def score_sets(config, network, verifier, sets, attacker, pirate, key) -> tuple[dict, dict, dict]:
  """Every cleanser's scores and flags of every set's images, and what was trained for them.

  Returns scores[cleanser][set] ([N] floats), flags[cleanser][set] ([N] bools,
  data_attacks.flags) and a summary of the ensemble and the folds
  (attacks.json). `pirate` is the pirate's clean model (`network`'s params);
  `attacker` its uint8 images and labels; `sets` needs "clean_distilled" for
  perturbation's reference.
  """
  acfg, names, summary, shared = config.attacks, data_attacks.cleansers(config.attacks), {}, {}
  if "ensemble_disagreement" in names:
    tick, inputs = time.time(), verifier.to_inputs(attacker[0])
    num_classes = verifier.num_classes
    members = train_ensemble(config, network, num_classes, inputs, attacker[1], key)
    summary["ensemble"] = _ensemble_summary(members, verifier, time.time() - tick)
  if "perturbation" in names:
    shared = {"real": attacker[0] / 255.0, "reference": sets["clean_distilled"]["pixels"]}
  scores, flags = {}, {}
  for i, (name, s) in enumerate(sets.items()):
    extra, predicted = dict(shared), None
    if "ensemble_disagreement" in names:
      extra["ensemble_logits"] = ensemble_logits(members, s["images"])
    if "self_consistency" in names:
      fold_key = jax.random.fold_in(jax.random.fold_in(key, 1000), i)
      held_out, entry = _self_consistency(config, network, name, s, fold_key)
      extra["held_out_logits"], predicted = held_out, held_out.argmax(-1)
      summary.setdefault("self_consistency", {})[name] = entry
    feats = data_attacks.features(network.apply, pirate, s["images"])
    logits = np.asarray(network.apply(pirate, jnp.asarray(s["images"])))
    by_name = data_attacks.image_scores(
      acfg, feats, logits, s["labels"], s["pixels"], verifier.patch_size, **extra
    )
    for cleanser, values in by_name.items():
      scores.setdefault(cleanser, {})[name] = values
      flagged = data_attacks.flags(cleanser, values, s["labels"], predicted)
      flags.setdefault(cleanser, {})[name] = flagged
  return scores, flags, summary
