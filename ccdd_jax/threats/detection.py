"""Detection: what a defender can tell from networks or data without the key.

The detectors:
  parameters      per-layer statistics (mean, std, kurtosis, L2 norm) of
                  networks trained on the watermarked vs the clean distilled
                  set: two-sample tests and the AUC of a reference distance;
  neural cleanse  trigger reverse engineering (Wang et al. 2019): per class
                  the smallest mask that flips clean inputs to it, and the MAD
                  anomaly index of the smallest (> 2 flags a backdoor);
  `roc_auc`       every detector's score as a ROC AUC (data_suite also scores
                  the cleansers' image scores with it).
"""

from collections.abc import Callable
import functools
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ccdd_jax.method import inner_loop

MAD_CONSTANT = 1.4826  # MAD -> standard deviation of a normal (Neural Cleanse).


ANOMALY_THRESHOLD = 2.0  # Neural Cleanse flags an anomaly index above 2.


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


def finite(value: float) -> float | None:
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
  inputs and must be traceable (Preprocessor.pixels_to_inputs with xp=jnp). Returns per
  network the norms [K], the final masks, the anomaly index and the flagged class.
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
