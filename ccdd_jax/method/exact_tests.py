"""The two exact tests of Stage III (they replace the paper's eq. 11).

A suspect answers n patterns' queries; `pattern_counts` tallies, per pattern,
the classes it answered (queries answered with their own class left out).
Under the null hypothesis (a model that never saw the key) the key's labels
y_i are independent uniform draws, so
  majority     P[Bin(n, 1/C) >= k] for k patterns whose plurality is y_i;
  conditional  P[sum_i counts[i, Y_i] >= t_obs] for iid uniform Y_i, computed
               exactly by convolution (`conditional_label_pvalue`).
No p-value can fall below C^-n (`p_floor`). docs/watermark-spec.md argues
why both are exact; verify.decide applies them.
"""

import fractions
import math

import numpy as np

from ccdd_jax.method import watermark


def check_predictions(predictions, pattern_ids, n_patterns, num_classes, carrier_labels):
  """Checked (predictions, pattern_ids, carrier_labels) of one suspect's answers."""
  pattern_ids = np.asarray(pattern_ids)
  predictions = watermark.check_labels(predictions, pattern_ids.size, num_classes, "predictions")
  pattern_ids = watermark.check_labels(pattern_ids, predictions.size, n_patterns, "pattern_ids")
  if carrier_labels is not None:
    carrier_labels = watermark.check_labels(
      carrier_labels, predictions.size, num_classes, "carrier_labels"
    )
  return predictions, pattern_ids, carrier_labels


def pattern_counts(
  predictions: np.ndarray,
  pattern_ids: np.ndarray,
  n_patterns: int,
  num_classes: int,
  carrier_labels: np.ndarray | None = None,
) -> np.ndarray:
  """Returns counts int64 [n, C]: queries of pattern i predicted as class c.

  With `carrier_labels` (each query's own class), a query predicted as its own
  class is not counted: counts[i, c] then counts only carriers of other
  classes, which is what both tests in `verify` need.
  """
  n_patterns = watermark.check_int("n_patterns", n_patterns, 1)
  num_classes = watermark.check_int("num_classes", num_classes, 2)
  predictions, pattern_ids, carrier_labels = check_predictions(
    predictions, pattern_ids, n_patterns, num_classes, carrier_labels
  )
  if carrier_labels is not None:
    counted = predictions != carrier_labels
    predictions, pattern_ids = predictions[counted], pattern_ids[counted]
  flat = np.bincount(pattern_ids * num_classes + predictions, minlength=n_patterns * num_classes)
  return flat.reshape(n_patterns, num_classes).astype(np.int64)


def _check_counts(counts, labels) -> tuple[np.ndarray, np.ndarray]:
  counts = np.asarray(counts)
  if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 2:
    raise ValueError(f"counts must have shape [n >= 1, C >= 2], got {counts.shape}")
  if counts.dtype.kind not in "iu" or counts.min() < 0:
    raise ValueError("counts must be non-negative integers")
  labels = watermark.check_labels(labels, counts.shape[0], counts.shape[1], "labels")
  return counts.astype(np.int64), labels


def plurality_matches(counts: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Returns bool [n]: labels[i] is the UNIQUE largest entry of counts[i]."""
  counts, labels = _check_counts(counts, labels)
  top = counts.max(axis=1)
  unique_top = (counts == top[:, None]).sum(axis=1) == 1
  return unique_top & (counts[np.arange(len(labels)), labels] == top)


def p_floor(num_classes: int, n_patterns: int) -> float:
  """The smallest p-value any model can reach, C^-n (docs/watermark-spec.md 6.4).

  With p_floor > alpha even a perfectly watermarked model is not verified.
  """
  return float(num_classes) ** -n_patterns


def majority_binomial_pvalue(k: int, n: int, num_classes: int) -> float:
  """Returns P[Bin(n, 1/C) >= k], exact, for k plurality matches of n."""
  k = watermark.check_int("k", k, 0)
  n = watermark.check_int("n", n, 0)
  num_classes = watermark.check_int("num_classes", num_classes, 2)
  if k <= 0:
    return 1.0
  if k > n:
    return 0.0
  # Upper-tail terms only, as exact integers over C^n; float() rounds once.
  numerator = sum(math.comb(n, j) * (num_classes - 1) ** (n - j) for j in range(k, n + 1))
  return float(fractions.Fraction(numerator, num_classes**n))


def conditional_label_pvalue(counts: np.ndarray, labels: np.ndarray) -> float:
  """Returns P[Σ_i counts[i, Y_i] >= t_obs] for iid uniform Y_i, exactly.

  Here t_obs = Σ_i counts[i, labels[i]]. Convolves the n per-pattern
  distributions in float64 over only the partial sums that can still reach
  t_obs (those certain to reach it are lumped into one absorbing state), so
  every number added is a non-negative tail term; no sampling, no normal
  approximation, no 1 - cdf.
  """
  counts, labels = _check_counts(counts, labels)
  t_obs = int(counts[np.arange(len(labels)), labels].sum())
  return _label_sum_upper_tail(counts, t_obs)


def _label_sum_upper_tail(counts: np.ndarray, threshold: int) -> float:
  """P[Σ_i counts[i, Y_i] >= threshold] for Y_i iid uniform on [0, C)."""
  n_patterns, num_classes = counts.shape
  row_max, row_min = counts.max(axis=1), counts.min(axis=1)
  # rest_max[i] = Σ_{j >= i} row_max[j]; rest_max[n] = 0. Likewise rest_min.
  rest_max = np.append(np.cumsum(row_max[::-1])[::-1], 0)
  rest_min = np.append(np.cumsum(row_min[::-1])[::-1], 0)
  if threshold <= rest_min[0]:
    return 1.0
  if threshold > rest_max[0]:
    return 0.0
  # Before pattern i, `mass[j]` is proportional to P[partial sum = lo + j] for
  # partial sums in [lo, hi) that can still reach the threshold, and mass[-1]
  # to P[partial sum >= hi], where lo = threshold - rest_max[i] and
  # hi = threshold - rest_min[i]; the true value is mass · exp(log_scale).
  lo, hi = threshold - rest_max[0], threshold - rest_min[0]
  mass = np.zeros(hi - lo + 1)
  mass[-lo] = 1.0
  log_scale = 0.0
  for i in range(n_patterns):
    new_size = (hi + row_min[i]) - (lo + row_max[i]) + 1
    new_mass = np.zeros(new_size)
    values, multiplicities = np.unique(counts[i], return_counts=True)
    for value, multiplicity in zip(values, multiplicities):
      # Old index j moves to j + value - row_max[i]; below 0 it cannot reach
      # the threshold any more, at new_size - 1 or above it surely does.
      moved = mass[row_max[i] - value :]
      body = min(moved.size, new_size - 1)
      new_mass[:body] += multiplicity * moved[:body]
      new_mass[-1] += multiplicity * moved[body:].sum()
    peak = new_mass.max()
    if peak == 0.0:  # Underflow: far below any usable significance level.
      return 0.0
    mass = new_mass / peak
    log_scale += math.log(peak) - math.log(num_classes)
    lo, hi = lo + row_max[i], hi + row_min[i]
  # Now lo == hi == threshold and mass[0] is P[T >= threshold] / exp(log_scale).
  return min(1.0, math.exp(math.log(mass[0]) + log_scale))
