"""Attacks on, and detection of, the distilled data itself: what a pirate who holds the
watermarked distilled set (not a model) tries, and what a defender can tell (issue 11).

Every function is pure: (config, arrays, rng) in, arrays or a dict out; `run`
strings them together for `--stage=attacks` (attacks.json's "data" section).
The pirate's view never includes the key: the cleansing scores below use the
images, their labels and a clean model of the pirate's own, trained on its
held-out clean data (`data.attacker_fraction`, as threats.py's attacks). The
owner then verifies the networks trained on what is left with the key
(threats.Verifier, threats.judge: "removed" only with Acc down < 5 points).

  Dataset cleansing: each distilled image gets an outlier score and the top
  k% are dropped (`cleanse`), then fresh networks train on the rest with
  evaluate.py's trainer (the learned lr, eval.epochs, the run's DSA).
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
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ccdd_jax import augment
from ccdd_jax import evaluate
from ccdd_jax import inner_loop
from ccdd_jax import threats
from ccdd_jax import watermark
from ccdd_jax.reporting import log

CLEANSERS = ("spectral", "clustering", "corner", "disagreement")
MAD_CONSTANT = 1.4826  # MAD -> standard deviation of a normal (Neural Cleanse).
ANOMALY_THRESHOLD = 2.0  # Neural Cleanse flags an anomaly index above 2.

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


# ----------------------------------------------------------------------------
# Scores of each image (what the pirate sees: images, labels, its own model).
# ----------------------------------------------------------------------------


def roc_auc(scores, positives) -> float:
  """ROC AUC of `scores` for the boolean `positives` (Mann-Whitney, ties count 1/2); nan if
  either group is empty."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  # Late: a CLI error need not load it.

  scores, positives = np.asarray(scores, np.float64), np.asarray(positives, bool)
  n_pos, n_neg = int(positives.sum()), int((~positives).sum())
  if not n_pos or not n_neg:
    return float("nan")
  ranks = stats.rankdata(scores)
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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


# ----------------------------------------------------------------------------
# Robust training.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Detection on models.
# ----------------------------------------------------------------------------


def parameter_statistics(stacked_params: Any) -> tuple[list[str], np.ndarray]:
  """Per network and layer parameter array: mean, std, kurtosis (Fisher) and L2 norm.

  Returns the statistics' names and an array [S, F].
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top

  names, columns = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(stacked_params)[0]:
    flat = np.asarray(leaf, np.float64).reshape(leaf.shape[0], -1)
    if flat.shape[1] < 2:
      continue
    where = "/".join(str(getattr(k, "key", k)) for k in path)
    kurt = stats.kurtosis(flat, axis=1)
    for stat, values in (
      ("mean", flat.mean(axis=1)),
      ("std", flat.std(axis=1)),
      ("kurtosis", np.nan_to_num(kurt)),
      ("l2", np.linalg.norm(flat, axis=1)),
    ):
      names.append(f"{where}:{stat}")
      columns.append(values)
  return names, np.stack(columns, axis=1)


def reference_distance(reference: np.ndarray, suspects: np.ndarray) -> np.ndarray:
  """Mean squared z-score of each suspect's statistics against reference networks' (a
  reference network is scored against the others, leave-one-out)."""

  def score(x, ref):
    std = ref.std(axis=0)
    z = (x - ref.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return float(np.mean(z**2))

  ref_scores = [score(reference[i], np.delete(reference, i, 0)) for i in range(len(reference))]
  return np.array(ref_scores + [score(x, reference) for x in suspects])


def parameter_detection(watermarked: Any, clean: Any) -> dict:
  """Two-sample tests per parameter statistic and the AUC of `reference_distance`, for
  networks trained on the watermarked vs the clean distilled set (clean = the reference)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  names, wm = parameter_statistics(watermarked)
  _, cl = parameter_statistics(clean)
  mw = np.array([stats.mannwhitneyu(w, c).pvalue for w, c in zip(wm.T, cl.T)])
  with warnings.catch_warnings():  # Ties: scipy falls back from the exact KS p-value, and says so.
    warnings.simplefilter("ignore", RuntimeWarning)
    ks = np.array([stats.ks_2samp(w, c).pvalue for w, c in zip(wm.T, cl.T)])
  scores = reference_distance(cl, wm)
  positives = np.r_[np.zeros(len(cl), bool), np.ones(len(wm), bool)]
  per_stat = [
    max(roc_auc(np.r_[c, w], positives), 1 - roc_auc(np.r_[c, w], positives))
    for w, c in zip(wm.T, cl.T)
  ]
  best = int(np.argmin(mw))
  return {
    "auc": roc_auc(scores, positives),
    "n_watermarked": len(wm),
    "n_clean": len(cl),
    "n_statistics": len(names),
    "min_p_mannwhitney": float(mw.min()),
    "min_p_ks": float(ks.min()),
    "bonferroni_p_mannwhitney": float(min(1.0, mw.min() * len(names))),
    "bonferroni_p_ks": float(min(1.0, ks.min() * len(names))),
    "significant_at_0.05_bonferroni": int(np.sum(mw * len(names) < 0.05)),
    "most_different_statistic": names[best],
    "max_single_statistic_auc": float(np.max(per_stat)),
    "scores_clean": scores[: len(cl)].tolist(),
    "scores_watermarked": scores[len(cl) :].tolist(),
  }


def anomaly_index(norms: np.ndarray) -> tuple[float, int]:
  """Neural Cleanse's MAD anomaly index of the smallest of `norms`, and its class.

  (median - min) / (1.4826 MAD); the MAD is floored at 1% of the median, so
  that a degenerate search (most classes at one norm) gives a finite index.
  """
  norms = np.asarray(norms, np.float64)
  median = np.median(norms)
  mad = MAD_CONSTANT * np.median(np.abs(norms - median))
  smallest = int(np.argmin(norms))
  return float((median - norms[smallest]) / max(mad, 0.01 * median, 1e-12)), smallest


def _finite(value: float) -> float | None:
  """`value`, or None for nan (attacks.json stays strict JSON)."""
  return None if value != value else float(value)


@functools.partial(jax.jit, static_argnums=(0, 1), static_argnames=("num_classes", "steps"))
def _reverse_engineer(
  apply_fn, to_inputs, params, pixels, rng, lam, lr, success, *, num_classes, steps
):
  """Per stacked network and class: the best (smallest successful) mask L1, the final
  attack success and mask [S, K, H, W, 1]."""
  height, width = pixels.shape[1:3]
  optimizer = optax.adam(lr)

  def one(p, target, key):
    key_mask, key_pattern = jax.random.split(key)
    variables = (
      0.1 * jax.random.normal(key_mask, (height, width, 1)),
      0.1 * jax.random.normal(key_pattern, pixels.shape[1:]),
    )
    targets = jnp.full((pixels.shape[0],), target)

    def loss_fn(v, weight):
      mask, pattern = jax.nn.sigmoid(v[0]), jax.nn.sigmoid(v[1])
      logits = apply_fn(p, to_inputs((1 - mask) * pixels + mask * pattern))
      l1 = jnp.sum(mask)
      hits = jnp.mean(jnp.argmax(logits, -1) == target)
      return inner_loop.cross_entropy(logits, targets) + weight * l1, (l1, hits)

    def step(carry, _):
      v, state, weight, best = carry
      (_, (l1, hits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(v, weight)
      reached = hits >= success
      best = jnp.where(reached, jnp.minimum(best, l1), best)
      # Neural Cleanse's schedule, per step: a heavier L1 weight while the mask works.
      weight = jnp.clip(jnp.where(reached, weight * 1.1, weight / 1.1), lam * 1e-2, lam * 1e2)
      updates, state = optimizer.update(grads, state)
      return (optax.apply_updates(v, updates), state, weight, best), None

    init = (variables, optimizer.init(variables), lam, jnp.float32(height * width))
    (v, _, weight, best), _ = jax.lax.scan(step, init, None, length=steps)
    _, (l1, hits) = loss_fn(v, weight)
    best = jnp.where(hits >= success, jnp.minimum(best, l1), best)
    return best, hits, jax.nn.sigmoid(v[0])

  classes = jnp.arange(num_classes)
  per_class = jax.vmap(one, in_axes=(None, 0, 0))
  keys = jax.random.split(rng, num_classes)
  return jax.vmap(lambda p: per_class(p, classes, keys))(params)


def neural_cleanse(
  apply_fn: Callable,
  stacked_params: Any,
  pixels: np.ndarray,
  to_inputs: Callable[[jax.Array], jax.Array],
  num_classes: int,
  rng: jax.Array,
  *,
  steps: int = 100,
  lr: float = 0.3,
  lam: float = 0.01,
  success: float = 0.9,
) -> dict:
  """Neural Cleanse on each stacked network, with clean [0, 1] `pixels` [N, H, W, C].

  Per class t: Adam on a mask m (sigmoid, [H, W, 1]) and pattern (sigmoid,
  [H, W, C]) minimising CE(f(to_inputs((1 - m) x + m pattern)), t) + w |m|_1,
  where w starts at `lam` and grows 1.1x after each step on which at least
  `success` of the images go to t, else shrinks 1.1x (Neural Cleanse's
  schedule, within [lam / 100, 100 lam]); the class's norm is the smallest
  |m|_1 seen at such a step (H W where never). `to_inputs` maps [0, 1] pixels to network
  inputs and must be traceable (`pixel_transform`). Returns per network the
  norms [K], the final masks, the anomaly index and the flagged class.
  """
  best, hits, masks = _reverse_engineer(
    apply_fn,
    to_inputs,
    jax.tree_util.tree_map(jnp.asarray, stacked_params),
    jnp.asarray(pixels, jnp.float32),
    rng,
    jnp.float32(lam),
    jnp.float32(lr),
    jnp.float32(success),
    num_classes=num_classes,
    steps=steps,
  )
  norms = np.asarray(best)
  indices = [anomaly_index(n) for n in norms]
  return {
    "norms": norms,
    "success": np.asarray(hits),
    "masks": np.asarray(masks),
    "anomaly_index": np.array([a for a, _ in indices]),
    "flagged_class": np.array([c for _, c in indices]),
  }


def corner_mass(masks: np.ndarray, patch: int) -> np.ndarray:
  """Per network, the mean over classes of the fraction of a reverse-engineered mask
  [S, K, H, W, 1] that lies on the top-left patch x patch corner."""
  masks = np.asarray(masks, np.float64)
  on_corner = masks[:, :, :patch, :patch].sum(axis=(2, 3, 4))
  return np.mean(on_corner / np.maximum(masks.sum(axis=(2, 3, 4)), 1e-12), axis=1)


def pixel_transform(preprocessor) -> Callable[[jax.Array], jax.Array]:
  """A preprocess.Preprocessor's [0, 1] pixels -> network inputs, as a traceable function."""
  if preprocessor.zca:
    mean, matrix = jnp.asarray(preprocessor.zca_mean), jnp.asarray(preprocessor.zca_transform)
    return lambda x: ((x.reshape(x.shape[0], -1) - mean) @ matrix).reshape(x.shape)
  mean, std = jnp.asarray(preprocessor.mean), jnp.asarray(preprocessor.std)
  return lambda x: (x - mean) / std


# ----------------------------------------------------------------------------
# The suite (attacks.json's "data" section).
# ----------------------------------------------------------------------------


def strengths(acfg, name: str) -> tuple:
  """The strengths of data attack `name` that the `attacks` config lists (() skips it)."""
  return threats.parse_list(acfg[DATA_ATTACKS[name][1]], float)


def cleansers(acfg) -> tuple:
  """The cleansing scores the `attacks` config names (data_cleansers)."""
  return threats.parse_list(acfg.data_cleansers)


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


def _fmt_auc(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.2f}"


def _pirate_model(config, network, verifier, attacker, key: jax.Array) -> tuple[Any, dict]:
  """The pirate's clean model: one network on its held-out data (eval.real_* recipe)."""
  acfg, ecfg, tick = config.attacks, config.eval, time.time()
  images, labels = attacker
  trainer = evaluate.make_networks_trainer(
    network.apply,
    config.dsa,
    epochs=acfg.data_clean_model_epochs,
    batch_size=ecfg.real_batch_size,
    momentum=ecfg.momentum,
    weight_decay=ecfg.weight_decay,
  )
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


def _attack_points(config, network, verifier, wm, scores, init, train_rng, before) -> dict:
  """Every data attack at every strength: {name: [measured points]} (threats.measured_point)."""
  acfg, ecfg, patch = config.attacks, config.eval, verifier.patch_size
  from_trigger = np.asarray(wm["from_trigger"], bool)
  trainers, points = {}, {}

  def train(images, labels, smoothing=0.0, corner_prob=None):
    spec = (len(labels), smoothing, corner_prob)
    if spec not in trainers:
      extra = None
      if corner_prob is not None:
        shift = int(images.shape[1] * acfg.data_crop_ratio + 0.5)
        extra = functools.partial(
          strong_augment, patch=patch, corner_prob=corner_prob, max_shift=shift
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
    return jax.device_get(trainers[spec](init, images, labels, float(wm["lr"]), train_rng))

  def record(name, value, params, tick, **extra):
    point = threats.measured_point(value, verifier.measure(params), before, time.time() - tick)
    points.setdefault(name, []).append({**point, **extra})
    slots = f", trigger slots dropped {extra['trigger_slots_dropped']}" if extra else ""
    log(
      f"[attacks] data {name} {DATA_ATTACKS[name][0]}={value:g}: Acc "
      f"{100 * point['acc']['mean']:.1f}% ({-100 * point['acc_drop']:+.1f}) Acc_W "
      f"{100 * point['acc_w']['mean']:.1f}%, verified {sum(point['verified'])}/"
      f"{len(point['verified'])}{slots}: {point['verdict']}"
    )

  for cleanser in cleansers(acfg):
    for fraction in strengths(acfg, f"cleanse_{cleanser}"):
      tick = time.time()
      keep = cleanse(scores[cleanser], fraction)
      params = train(wm["images"][keep], wm["labels"][keep])
      dropped = np.setdiff1d(np.arange(len(from_trigger)), keep)
      slots = int(from_trigger[dropped].sum())
      record(
        f"cleanse_{cleanser}",
        fraction,
        params,
        tick,
        dropped=len(dropped),
        trigger_slots_dropped=slots,
      )
  for smoothing in strengths(acfg, "label_smoothing"):
    tick = time.time()
    record("label_smoothing", smoothing, train(wm["images"], wm["labels"], smoothing), tick)
  # On 8x8 digits the 4x4 trigger corner is a quarter of the image: a corner
  # cutout, crop and flip on every batch may destroy accuracy (an earlier
  # measurement: 46% Acc), which the verdict then counts as "destroyed".
  for corner_prob in strengths(acfg, "strong_augment"):
    tick = time.time()
    params = train(wm["images"], wm["labels"], corner_prob=corner_prob)
    record("strong_augment", corner_prob, params, tick)
  return points


def _detect(config, network, verifier, preprocessor, sets, networks, scores, pixels, key):
  """The detectors: parameter statistics, Neural Cleanse, and the data scores (AUCs)."""
  acfg, wm, clean = config.attacks, sets["distilled"], sets["clean_distilled"]
  detection = {
    "parameters": parameter_detection(networks["distilled"], networks["clean_distilled"])
  }
  d = detection["parameters"]
  log(
    f"[attacks] data detection, parameter statistics: AUC {d['auc']:.2f}, smallest "
    f"Mann-Whitney p {d['min_p_mannwhitney']:.3g} of {d['n_statistics']} (Bonferroni "
    f"{d['bonferroni_p_mannwhitney']:.3g})"
  )
  nc = {
    name: neural_cleanse(
      network.apply,
      networks[name],
      pixels,
      pixel_transform(preprocessor),
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
  corner = {n: corner_mass(r["masks"], verifier.patch_size) for n, r in nc.items()}
  detection["neural_cleanse"] = {
    "auc": roc_auc(np.r_[a_clean, a_wm], negatives_then_positives),
    "auc_median_norm": roc_auc(
      np.r_[median["clean_distilled"], median["distilled"]], negatives_then_positives
    ),
    "auc_corner_mass": roc_auc(
      np.r_[corner["clean_distilled"], corner["distilled"]], negatives_then_positives
    ),
    "threshold": ANOMALY_THRESHOLD,
    "images": len(pixels),
    "steps": acfg.data_nc_steps,
    **{
      name: {
        "anomaly_index": r["anomaly_index"].tolist(),
        "flagged": int(np.sum(r["anomaly_index"] > ANOMALY_THRESHOLD)),
        "smallest_class": r["flagged_class"].tolist(),
        "norms": r["norms"].tolist(),
        "corner_mass": corner[name].tolist(),
      }
      for name, r in nc.items()
    },
  }
  d = detection["neural_cleanse"]
  log(
    f"[attacks] data detection, Neural Cleanse: AUC {d['auc']:.2f} (anomaly index), "
    f"{d['auc_median_norm']:.2f} (median mask norm), {d['auc_corner_mass']:.2f} (corner "
    f"mass); anomaly index > {ANOMALY_THRESHOLD:g} in {d['distilled']['flagged']}/{len(a_wm)} "
    f"watermarked-set and {d['clean_distilled']['flagged']}/{len(a_clean)} clean-set networks"
  )
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
  detection["data"] = {}
  from_trigger = np.asarray(wm["from_trigger"], bool)
  for name, by_set in scores.items():
    on_wm, on_clean = by_set["distilled"], by_set["clean_distilled"]
    set_labels = np.r_[np.zeros(len(on_clean), bool), np.ones(len(on_wm), bool)]
    e = detection["data"][name] = {
      "trigger_slots_auc": _finite(roc_auc(on_wm, from_trigger)),
      "set_auc": _finite(roc_auc(np.r_[on_clean, on_wm], set_labels)),
      "uses_key": name == "trigger_visibility",
    }
    log(
      f"[attacks] data detection, {name} scores: AUC {_fmt_auc(e['trigger_slots_auc'])} for "
      f"trigger slots, {_fmt_auc(e['set_auc'])} for watermarked vs clean set images"
    )
  return detection


def run(
  config,
  *,
  network,
  verifier: threats.Verifier,
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
    "attacks": {n: {"strength": s, "description": d} for n, (s, _, d) in DATA_ATTACKS.items()},
    "before": {**threats.measured_point(None, before, before, 0.0), "verdict": "unattacked"},
  }
  log(
    f"[attacks] data: {len(wm['labels'])} distilled images ({int(from_trigger.sum())} trigger "
    f"slots), {count} networks per point"
  )
  key = jax.random.PRNGKey(int(rng.integers(2**31)))
  pirate, result["clean_model"] = _pirate_model(config, network, verifier, attacker, key)
  scores = {}  # scores[cleanser][set name]: [N]
  for name, s in sets.items():
    feats = features(network.apply, pirate, s["images"])
    logits = np.asarray(network.apply(pirate, jnp.asarray(s["images"])))
    for cleanser, values in image_scores(
      acfg, feats, logits, s["labels"], s["pixels"], verifier.patch_size
    ).items():
      scores.setdefault(cleanser, {})[name] = values
  distilled_scores = {c: by_set["distilled"] for c, by_set in scores.items()}
  result["points"] = _attack_points(
    config, network, verifier, wm, distilled_scores, first(init_params), train_rng, before
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
  result["seconds"] = time.time() - start
  return result
