"""Attacks on the distilled data itself: what a pirate holding the set (not a model) tries.

The pirate never holds the key. Each cleansing score ranks the set's images
from the images, their labels and a clean model of the pirate's own
(data_suite trains it on its held-out data); `cleanse` drops the top k%:
  spectral     spectral signatures (Tran, Li, Madry 2018): per class, the
               squared projection of centred features on their top singular
               vector;
  clustering   activation clustering (Chen et al. 2018): per class, PCA then
               2-means; the smaller cluster first;
  corner       how far an image's top-left patch differs from the set's
               typical corner (no key);
  disagreement 1 - the pirate's model's probability of the image's label.
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

from ccdd_jax.method import augment
from ccdd_jax.threats import suite

CLEANSERS = ("spectral", "clustering", "corner", "disagreement")


# name -> (what the strength is, its `attacks` field, description).
DATA_ATTACKS = {
  **{
    f"cleanse_{c}": ("fraction", "data_drop_fractions", f"drop the top k% by {c} score")
    for c in CLEANSERS
  },
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


def disagreement_scores(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """1 - softmax(logits)[label] per image: how little a clean model believes the label."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  return 1.0 - probs[np.arange(len(labels)), np.asarray(labels)]


def cleanse(scores: np.ndarray, fraction: float) -> np.ndarray:
  """Indices (sorted) kept after dropping exactly round(fraction N) highest scores (ties:
  the later image is dropped first)."""
  scores = np.asarray(scores)
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"the fraction dropped must lie in [0, 1), got {fraction}")
  drop = int(round(fraction * len(scores)))
  order = np.lexsort((-np.arange(len(scores)), -scores))  # Highest first; ties: later first.
  return np.sort(order[drop:])


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
  return suite.parse_list(acfg[DATA_ATTACKS[name][1]], float)


def cleansers(acfg) -> tuple:
  """The cleansing scores the `attacks` config names (data_cleansers)."""
  return suite.parse_list(acfg.data_cleansers)


def image_scores(acfg, feats, logits, labels, pixels, patch) -> dict:
  """Every cleansing score of one set's images: {name: [N]} (`feats`, `logits`: the
  pirate's clean model's features and logits of the images)."""
  scorers = {
    "spectral": lambda: spectral_scores(feats, labels),
    "clustering": lambda: clustering_scores(feats, labels, acfg.data_cluster_dims),
    "corner": lambda: corner_scores(pixels, patch),
    "disagreement": lambda: disagreement_scores(logits, labels),
  }
  return {name: scorers[name]() for name in cleansers(acfg)}
