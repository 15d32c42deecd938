"""Attacks on the distilled data itself: what a pirate holding the set (not a model) tries.

The pirate never holds the key. Each cleansing score ranks the set's images
from the images, their labels, a clean model of the pirate's own (data_suite
trains it on its held-out data) or models trained on the set itself;
`cleanse` drops the top k%, and each cleanser's rule (`FLAG_RULES`, `flags`)
says which images it flags outright (the pirate drops exactly those):
  spectral     spectral signatures (Tran, Li, Madry 2018): per class, the
               squared projection of centred features on their top singular
               vector;
  clustering   activation clustering (Chen et al. 2018): per class, PCA then
               2-means; the smaller cluster first;
  corner       how far an image's top-left patch differs from the set's
               typical corner (no key);
  disagreement 1 - the pirate's model's probability of the image's label;
  ensemble_disagreement  the same over an ensemble of clean models of several
               architectures (the mean probability of the label);
  self_consistency  no real data: 1 - the probability of the image's label by
               the model of a k-fold split of the set that held the image out;
  perturbation crafted-perturbation statistics (high-frequency energy, distance
               to the nearest real image) as robust z-scores against clean
               distilled images, the larger of the two.
`drop_random` drops a random k% (`random_drop`): the chance a cleanser's top k%
must beat before its drop says it found anything.
Robust training: label smoothing (evaluate's trainer) or `strong_augment`
(a corner cutout with probability `corner_prob`, random crop, flip) on top
of DSA. data_suite.run measures each and judges it with the owner's key.
"""

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ccdd_jax import lists
from ccdd_jax.method import augment
from ccdd_jax.threats import detection

CLEANSERS = (
  "spectral",
  "clustering",
  "corner",
  "disagreement",
  "ensemble_disagreement",
  "self_consistency",
  "perturbation",
)

Z_FLAG = 3.0  # Spectral, corner, perturbation: flag beyond 3 (robust) standard deviations.
PROB_FLAG = 0.5  # Disagreement scores: flag an own-label probability below 1/2.
CLUSTER_FLAG_SHARE = 1 / 3  # Clustering: flag a smaller cluster of at most this share.
CHI2_1_MEDIAN = 0.454936423119572  # The median of chi^2 with one degree of freedom.

# Which images each cleanser flags (`flags`), in words (attacks.json, report.md: no "|").
FLAG_RULES = {
  "spectral": "projection beyond 3 robust SDs of its class (SD^2 = median square / 0.455)",
  "clustering": "in its class's smaller 2-means cluster, if that holds <= 1/3 of the class",
  "corner": "corner distance's robust z > 3 (median, MAD of the set)",
  "disagreement": "the clean model's probability of its label < 0.5",
  "ensemble_disagreement": "the ensemble's mean probability of its label < 0.5",
  "self_consistency": "the model of the fold that held it out predicts another class",
  "perturbation": "robust z > 3 against the clean reference (either statistic)",
}


# name -> (what the strength is, its `attacks` field, description).
DATA_ATTACKS = {
  **{
    f"cleanse_{c}": ("fraction", "data_drop_fractions", f"drop the top k% by {c} score")
    for c in CLEANSERS
  },
  **{
    f"flagged_{c}": ("flagged", "data_drop_flagged", f"drop exactly the images {c} flags")
    for c in CLEANSERS
  },
  "drop_random": ("fraction", "data_drop_fractions", "drop a random k% (the cleansers' chance)"),
  "label_smoothing": ("smoothing", "data_label_smoothing", "train with label smoothing"),
  "strong_augment": (
    "corner_prob",
    "data_strong_augment",
    "train with cutout (on the corner with this probability), crop and flip",
  ),
}


@functools.partial(jax.jit, static_argnums=0)
def _features(apply_fn, params, inputs):
  _, features = apply_fn(params, inputs, return_features=True)
  return features.reshape(features.shape[0], -1)


def features(apply_fn: Callable, params: Any, inputs: np.ndarray) -> np.ndarray:
  """One network's last-conv-block features of `inputs`, flattened: [N, D] float64."""
  chunks = [
    _features(apply_fn, params, jnp.asarray(inputs[s : s + 512]))
    for s in range(0, len(inputs), 512)
  ]
  return np.concatenate([np.asarray(c, np.float64) for c in chunks])


def spectral_scores(feats: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Spectral signatures: per class, squared projection of centred features on their top
  right singular vector, over the class mean of those squares (0 for a class of one)."""
  feats, labels = np.asarray(feats, np.float64), np.asarray(labels)
  scores = np.zeros(len(labels))
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    centred = feats[idx] - feats[idx].mean(axis=0)
    if len(idx) < 2 or not np.any(centred):
      continue
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    squares = (centred @ top) ** 2
    scores[idx] = squares / max(squares.mean(), 1e-12)
  return scores


def clustering_scores(
  feats: np.ndarray, labels: np.ndarray, dims: int = 10, seed: int = 0
) -> np.ndarray:
  """Activation clustering: per class, PCA to min(dims, n - 1) dimensions and 2-means.

  Score = 1 for members of the strictly smaller cluster, plus the distance to
  the larger cluster's centre over the class's largest such distance (in
  [0, 1]): the smaller cluster ranks first, then the far members.
  """
  from sklearn import cluster  # pylint: disable=g-import-not-at-top

  feats, labels = np.asarray(feats, np.float64), np.asarray(labels)
  scores = np.zeros(len(labels))
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    centred = feats[idx] - feats[idx].mean(axis=0)
    if len(idx) < 3 or not np.any(centred):
      continue
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    reduced = u[:, : min(dims, len(idx) - 1)] * s[: min(dims, len(idx) - 1)]
    km = cluster.KMeans(2, n_init=10, random_state=seed).fit(reduced)
    sizes = np.bincount(km.labels_, minlength=2)
    large = int(np.argmax(sizes))
    distance = np.linalg.norm(reduced - km.cluster_centers_[large], axis=1)
    scores[idx] = distance / max(distance.max(), 1e-12)
    if sizes[0] != sizes[1]:
      scores[idx] += km.labels_ != large
  return scores


def corner_scores(pixels: np.ndarray, patch: int) -> np.ndarray:
  """How far each image's top-left patch x patch corner lies from the set's median corner,
  over the RMS of that distance over the set (no key: what anyone can see)."""
  pixels = np.asarray(pixels, np.float64)
  corners = pixels[:, :patch, :patch, :].reshape(len(pixels), -1)
  distance = np.linalg.norm(corners - np.median(corners, axis=0), axis=1)
  return distance / max(np.sqrt(np.mean(distance**2)), 1e-12)


def softmax(logits: np.ndarray) -> np.ndarray:
  """Softmax over the last axis, in float64."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return probs / probs.sum(axis=-1, keepdims=True)


def disagreement_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """1 - softmax(logits)[label] per image: how little a clean model believes the label."""
  labels = np.asarray(labels)
  return 1.0 - softmax(logits)[np.arange(len(labels)), labels]


def ensemble_disagreement_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """`logits` [M, N, K] of M models: 1 - the mean over models of the label's probability."""
  labels = np.asarray(labels)
  return 1.0 - softmax(logits)[:, np.arange(len(labels)), labels].mean(axis=0)


def high_frequency_energy(pixels: np.ndarray) -> np.ndarray:
  """Mean squared difference between each image and its 3x3 box blur (edges replicated): [N]."""
  x = np.asarray(pixels, np.float64)
  height, width = x.shape[1:3]
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  blur = sum(padded[:, i : i + height, j : j + width] for i in range(3) for j in range(3)) / 9.0
  return np.mean((x - blur) ** 2, axis=(1, 2, 3))


def nearest_distance(pixels: np.ndarray, real: np.ndarray) -> np.ndarray:
  """L2 distance in pixel space from each image to its nearest image of `real`: [N]."""
  a = np.asarray(pixels, np.float64).reshape(len(pixels), -1)
  b = np.asarray(real, np.float64).reshape(len(real), -1)
  squares = (b**2).sum(axis=1)
  out = [
    ((chunk**2).sum(axis=1)[:, None] + squares[None] - 2.0 * chunk @ b.T).min(axis=1)
    for chunk in np.array_split(a, max(1, -(-len(a) // 256)))
  ]
  return np.sqrt(np.maximum(np.concatenate(out), 0.0))


def robust_z(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """(values - median) / (1.4826 MAD) of `reference` (a MAD of 0 counts as 1e-12)."""
  reference = np.asarray(reference, np.float64)
  median = np.median(reference)
  mad = detection.MAD_CONSTANT * np.median(np.abs(reference - median))
  return (np.asarray(values, np.float64) - median) / max(mad, 1e-12)


def perturbation_scores(pixels: np.ndarray, real: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """A crafted-perturbation detector: each image's high-frequency energy and distance to its
  nearest `real` image as robust z-scores against the `reference` images' (`robust_z`), the
  larger of the two. `reference`: clean distilled images (data_suite: the run's clean set)."""
  stats = lambda p: (high_frequency_energy(p), nearest_distance(p, real))
  z = [robust_z(v, r) for v, r in zip(stats(pixels), stats(reference))]
  return np.maximum(z[0], z[1])


def flags(
  name: str, scores: np.ndarray, labels: np.ndarray, predictions: np.ndarray | None = None
) -> np.ndarray:
  """The images cleanser `name`'s rule (`FLAG_RULES`) flags, from its `scores`: bool [N].

  `predictions` (the held-out folds' classes) only for self_consistency.
  """
  scores, labels = np.asarray(scores, np.float64), np.asarray(labels)
  if name in ("disagreement", "ensemble_disagreement"):
    return scores > 1.0 - PROB_FLAG
  if name == "self_consistency":
    if predictions is None:
      raise ValueError("self_consistency's flags need the held-out folds' predictions")
    return np.asarray(predictions) != labels
  if name == "corner":
    return robust_z(scores, scores) > Z_FLAG
  if name == "perturbation":
    return scores > Z_FLAG
  if name not in ("spectral", "clustering"):
    raise ValueError(f"unknown cleanser {name!r}")
  out = np.zeros(len(scores), bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    if name == "spectral":  # A score is a square over the class mean: a robust z^2 > 9.
      median = np.median(scores[idx])
      out[idx] = (median > 0) & (scores[idx] > Z_FLAG**2 * median / CHI2_1_MEDIAN)
    else:  # The strictly smaller cluster's members score 1 + a distance in (0, 1].
      smaller = scores[idx] > 1.0
      out[idx] = smaller & (smaller.mean() <= CLUSTER_FLAG_SHARE)
  return out


def cleanse(scores: np.ndarray, fraction: float) -> np.ndarray:
  """Indices (sorted) kept after dropping exactly round(fraction N) highest scores (ties:
  the later image is dropped first)."""
  scores = np.asarray(scores)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"the fraction dropped must lie in [0, 1), got {fraction}")
  drop = int(round(fraction * len(scores)))
  order = np.lexsort((-np.arange(len(scores)), -scores))  # Highest first; ties: later first.
  return np.sort(order[drop:])


def random_drop(n: int, fraction: float, key: jax.Array) -> np.ndarray:
  """Indices (sorted) kept after dropping round(fraction n) images drawn uniformly by `key`."""
  return cleanse(np.asarray(jax.random.uniform(key, (n,))), fraction)


def corner_cutout(images: jax.Array, rng: jax.Array, patch: int, corner_prob: float) -> jax.Array:
  """Zeros a patch x patch square per image: the top-left corner (where triggers sit) with
  probability `corner_prob`, else anywhere (centre uniform, as DSA's cutout)."""
  batch, height, width, _ = images.shape
  rng_where, rng_centre = jax.random.split(rng)
  on_corner = jax.random.uniform(rng_where, (batch,)) < corner_prob
  limit = jnp.array([height + 1 - patch % 2, width + 1 - patch % 2], jnp.int32)
  anywhere = jax.random.randint(rng_centre, (batch, 2), 0, limit, jnp.int32)
  corner = jnp.full((batch, 2), patch // 2, jnp.int32)  # cut_out's box starts at centre - p // 2.
  return augment.cut_out(images, jnp.where(on_corner[:, None], corner, anywhere), (patch, patch))


def strong_augment(
  images: jax.Array,
  rng: jax.Array,
  *,
  patch: int,
  corner_prob: float,
  max_shift: int,
  flip_prob: float = 0.5,
) -> jax.Array:
  """`corner_cutout`, then a random crop (shift by up to `max_shift` pixels, zero fill), then
  a horizontal flip with probability `flip_prob`, on every image."""
  rng_cut, rng_shift, rng_flip = jax.random.split(rng, 3)
  x = corner_cutout(images, rng_cut, patch, corner_prob)
  shifts = jax.random.randint(rng_shift, (x.shape[0], 2), -max_shift, max_shift + 1, jnp.int32)
  x = augment.translate(x, shifts)
  return augment.flip_where(x, jax.random.uniform(rng_flip, (x.shape[0],)) < flip_prob)


def strengths(acfg, name: str) -> tuple:
  """The strengths of data attack `name` that the `attacks` config lists (() skips it)."""
  return lists.parse_list(acfg[DATA_ATTACKS[name][1]], float)


def cleansers(acfg) -> tuple:
  """The cleansing scores the `attacks` config names (data_cleansers)."""
  return lists.parse_list(acfg.data_cleansers)


def image_scores(
  acfg,
  feats,
  logits,
  labels,
  pixels,
  patch,
  *,
  ensemble_logits=None,
  held_out_logits=None,
  real=None,
  reference=None,
) -> dict:
  """Every cleansing score `acfg.data_cleansers` names of one set's images: {name: [N]}.

  `feats`, `logits`: the pirate's clean model's features and logits of the
  images; `ensemble_logits` [M, N, K]: its ensemble's (ensemble_disagreement);
  `held_out_logits` [N, K]: each image's by the fold model that held it out
  (self_consistency); `real` and `reference`: the pirate's real pixels and
  clean distilled pixels (perturbation). Each is needed only by its cleanser.
  """
  scorers = {
    "spectral": lambda: spectral_scores(feats, labels),
    "clustering": lambda: clustering_scores(feats, labels, acfg.data_cluster_dims),
    "corner": lambda: corner_scores(pixels, patch),
    "disagreement": lambda: disagreement_scores(logits, labels),
    "ensemble_disagreement": lambda: ensemble_disagreement_scores(ensemble_logits, labels),
    "self_consistency": lambda: disagreement_scores(held_out_logits, labels),
    "perturbation": lambda: perturbation_scores(pixels, real, reference),
  }
  return {name: scorers[name]() for name in cleansers(acfg)}
