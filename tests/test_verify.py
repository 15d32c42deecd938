"""The verification of ccdd_jax.method.verify and the exact tests of method/exact_tests.py.

Watermark accuracy and per-pattern counts, the majority and conditional p-values against
brute-force enumeration, and `verify` on models that did or never did see the key.
"""

import collections
import fractions
import itertools
import json
import math

import numpy as np
import pytest
from test_watermark import TEST_KEY

from ccdd_jax import CCDDError
from ccdd_jax.method import exact_tests
from ccdd_jax.method import verify
from ccdd_jax.method import watermark

# ------------------------------------------------ watermark accuracy and counts


def test_watermark_accuracy_and_pattern_counts():
  predictions = np.array([3, 3, 1, 0, 2, 2, 2])
  pattern_ids = np.array([0, 0, 0, 1, 1, 1, 1])
  pattern_labels = np.array([3, 2])
  carrier_labels = np.array([1, 3, 0, 2, 2, 1, 0])
  assert verify.watermark_accuracy(predictions, pattern_ids, pattern_labels) == 5 / 7
  # Queries 1, 3 and 4 carry an image of their target's own class: left out.
  assert (
    verify.watermark_accuracy(predictions, pattern_ids, pattern_labels, carrier_labels) == 3 / 4
  )
  counts = exact_tests.pattern_counts(predictions, pattern_ids, 2, 4)
  np.testing.assert_array_equal(counts, [[0, 1, 0, 2], [1, 0, 3, 0]])
  # Queries predicted as their own class never count.
  counts = exact_tests.pattern_counts(predictions, pattern_ids, 2, 4, carrier_labels=carrier_labels)
  np.testing.assert_array_equal(counts, [[0, 1, 0, 1], [1, 0, 2, 0]])
  with pytest.raises(ValueError, match="predictions"):
    exact_tests.pattern_counts(predictions + 1, pattern_ids, 2, 4)


# ---------------------------------------------- statistics vs brute force


def _brute_force_tails(counts, unique_plurality_only):
  """Exact P[K >= k] and P[T >= t] over all C^n label vectors, as Fractions."""
  n, num_classes = counts.shape
  k_hist, t_hist = collections.Counter(), collections.Counter()
  for labels in itertools.product(range(num_classes), repeat=n):
    k = 0
    for row, label in zip(counts.tolist(), labels):
      top = max(row)
      is_top = row[label] == top
      if is_top and (row.count(top) == 1 or not unique_plurality_only):
        k += 1
    k_hist[k] += 1
    t_hist[sum(row[label] for row, label in zip(counts.tolist(), labels))] += 1
  total = num_classes**n

  def tail(hist, x):
    return fractions.Fraction(sum(c for v, c in hist.items() if v >= x), total)

  return (lambda k: tail(k_hist, k)), (lambda t: tail(t_hist, t)), t_hist


@pytest.mark.parametrize("n, num_classes, seed", [(4, 3, 0), (3, 5, 1), (5, 2, 2), (4, 4, 3)])
def test_majority_pvalue_matches_enumeration(n, num_classes, seed):
  rng = np.random.default_rng(seed)
  # Rows with a unique maximum: the test is exactly Bin(n, 1/C).
  counts = np.stack([rng.permutation(num_classes) * 3 + 1 for _ in range(n)])
  k_tail, _, _ = _brute_force_tails(counts, unique_plurality_only=True)
  for k in range(n + 2):
    assert exact_tests.majority_binomial_pvalue(k, n, num_classes) == float(k_tail(k))
  # Rows with ties: never more false claims than Bin(n, 1/C) allows, whereas
  # counting a tie as a match would be anti-conservative.
  tied = counts.copy()
  tied[:, 1] = tied.max(axis=1)
  k_tail, _, _ = _brute_force_tails(tied, unique_plurality_only=True)
  liberal_tail, _, _ = _brute_force_tails(tied, unique_plurality_only=False)
  for k in range(n + 1):
    assert k_tail(k) <= exact_tests.majority_binomial_pvalue(k, n, num_classes)
  assert liberal_tail(n) > exact_tests.majority_binomial_pvalue(n, n, num_classes)


def test_plurality_matches_ties_never_match():
  counts = np.array([[5, 5, 0], [1, 6, 2], [0, 0, 0], [3, 2, 3]])
  matches = exact_tests.plurality_matches(counts, np.array([0, 1, 0, 2]))
  assert matches.tolist() == [False, True, False, False]


def test_majority_pvalue_reproduces_reference_thresholds():
  # reference-facts.md, "Verification statistics": smallest k with p <= alpha.
  table = {
    10: (5, 6, 8),
    15: (6, 7, 10),
    20: (7, 8, 11),
    30: (8, 10, 14),
    50: (11, 14, 18),
    100: (19, 21, 28),
  }
  for n, thresholds in table.items():
    for alpha, expected_k in zip((1e-2, 1e-3, 1e-6), thresholds):
      k = next(k for k in range(n + 1) if exact_tests.majority_binomial_pvalue(k, n, 10) <= alpha)
      assert k == expected_k, (n, alpha)
  # The paper's rule (n = 10, tau = 1) accepts a random model this often.
  assert exact_tests.majority_binomial_pvalue(1, 10, 10) == pytest.approx(1 - 0.9**10, rel=1e-15)
  assert exact_tests.majority_binomial_pvalue(300, 300, 200) == 200.0**-300


@pytest.mark.parametrize(
  "n, num_classes, m, seed", [(4, 3, 6, 0), (3, 5, 9, 1), (5, 4, 7, 2), (2, 7, 20, 3), (6, 2, 5, 4)]
)
def test_conditional_pvalue_matches_enumeration(n, num_classes, m, seed):
  rng = np.random.default_rng(seed)
  counts = np.stack([rng.multinomial(m, rng.dirichlet(np.ones(num_classes))) for _ in range(n)])
  _, t_tail, t_hist = _brute_force_tails(counts, unique_plurality_only=True)
  tested = 0
  for labels in itertools.product(range(num_classes), repeat=n):
    t = int(counts[np.arange(n), labels].sum())
    exact = float(t_tail(t))
    p = exact_tests.conditional_label_pvalue(counts, np.array(labels))
    assert p == pytest.approx(exact, rel=1e-12), (labels, t)
    tested += 1
  assert tested == num_classes**n and len(t_hist) > 1


def _exact_label_sum_tail(counts, threshold):
  """P[Σ_i counts[i, Y_i] >= threshold] by dynamic programming on integers."""
  partial_sums = {0: 1}
  for row in counts.tolist():
    grown = collections.Counter()
    for s, ways in partial_sums.items():
      for value in row:
        grown[s + value] += ways
    partial_sums = grown
  hits = sum(w for s, w in partial_sums.items() if s >= threshold)
  return fractions.Fraction(hits, counts.shape[1] ** counts.shape[0])


def test_conditional_pvalue_matches_exact_integers_far_in_the_tail():
  rng = np.random.default_rng(6)
  n, num_classes, m = 30, 10, 20
  counts = np.stack([rng.multinomial(m, rng.dirichlet(np.ones(num_classes))) for _ in range(n)])
  labels = counts.argmax(axis=1)  # The most extreme statistic possible.
  for drop in (0, 5, 40, 120, 200):
    labels_now = labels.copy()
    # Lower t step by step by moving labels to smaller entries.
    order = np.argsort(counts, axis=1)
    for i in range(n):
      if drop <= 0:
        break
      take = min(drop, counts[i, labels_now[i]] - counts[i, order[i, 0]])
      labels_now[i] = order[i, 0] if take else labels_now[i]
      drop -= take
    t = int(counts[np.arange(n), labels_now].sum())
    exact = _exact_label_sum_tail(counts, t)
    p = exact_tests.conditional_label_pvalue(counts, labels_now)
    assert p == pytest.approx(float(exact), rel=1e-10), t
  assert exact_tests.conditional_label_pvalue(counts, labels) < 1e-20


def test_conditional_pvalue_edge_cases():
  assert exact_tests.conditional_label_pvalue(np.zeros((3, 4), int), [0, 1, 2]) == 1.0
  counts = np.array([[9, 0, 0], [0, 0, 9]])
  assert exact_tests.conditional_label_pvalue(counts, [0, 2]) == pytest.approx(1 / 9, rel=1e-15)
  assert exact_tests.conditional_label_pvalue(counts, [1, 1]) == 1.0
  with pytest.raises(ValueError, match="labels"):
    exact_tests.conditional_label_pvalue(counts, [0, 3])
  with pytest.raises(ValueError, match="counts"):
    exact_tests.conditional_label_pvalue(-counts, [0, 2])


def test_conditional_pvalue_is_fast_at_full_scale():
  rng = np.random.default_rng(7)
  n, num_classes, m = 100, 200, 1000
  labels = rng.integers(0, num_classes, n)
  counts = rng.multinomial(m - 600, np.ones(num_classes) / num_classes, size=n)
  counts[np.arange(n), labels] += 600
  # Each label sits on the unique maximum of its row: p = C^-n exactly.
  assert exact_tests.conditional_label_pvalue(counts, labels) == pytest.approx(
    200.0**-100, rel=1e-9
  )
  null_counts = rng.multinomial(m, np.ones(num_classes) / num_classes, size=n)
  assert 0.0 < exact_tests.conditional_label_pvalue(null_counts, labels) <= 1.0


def test_conditional_false_positive_rate_at_nominal_level():
  rng = np.random.default_rng(8)
  n, num_classes, m, draws = 10, 10, 50, 20_000
  counts = np.stack([rng.multinomial(m, rng.dirichlet(np.ones(num_classes))) for _ in range(n)])
  label_vectors = rng.integers(0, num_classes, (draws, n))
  statistics = counts[np.arange(n), label_vectors].sum(axis=1)
  # p depends on the labels only through t: compute it once per observed t.
  p_of_t = {}
  for t, labels in zip(statistics.tolist(), label_vectors):
    if t not in p_of_t:
      p_of_t[t] = exact_tests.conditional_label_pvalue(counts, labels)
  ts = sorted(p_of_t)
  assert all(p_of_t[a] >= p_of_t[b] for a, b in zip(ts, ts[1:]))
  p_values = np.array([p_of_t[t] for t in statistics.tolist()])
  for alpha in (0.05, 0.01):
    size = max(p for p in p_of_t.values() if p <= alpha)  # Attainable level.
    rate = float(np.mean(p_values <= alpha))
    slack = 4 * math.sqrt(alpha * (1 - alpha) / draws)
    assert rate <= alpha + slack
    assert abs(rate - size) <= slack  # p-values are calibrated, not loose.
    assert size > 0.7 * alpha  # The null is fine-grained here.


def test_conditional_detects_sub_majority_watermark():
  n, num_classes = 10, 10
  labels = np.arange(n) % num_classes
  counts = np.zeros((n, num_classes), np.int64)
  for i, label in enumerate(labels):
    confused = (label + 1) % num_classes
    others = [c for c in range(num_classes) if c not in (label, confused)]
    counts[i, label] = 15  # 30% of the m = 50 queries.
    counts[i, confused] = 16  # A stronger confusion.
    counts[i, others] = [3, 3, 3, 2, 2, 2, 2, 2]
  assert counts.sum(axis=1).tolist() == [50] * n
  k = int(exact_tests.plurality_matches(counts, labels).sum())
  assert k == 0
  assert exact_tests.majority_binomial_pvalue(k, n, num_classes) == 1.0
  # T >= 150 needs every label on its 15 or 16: P = 0.2^10 ≈ 1e-7.
  p = exact_tests.conditional_label_pvalue(counts, labels)
  assert p == pytest.approx(0.2**10, rel=1e-12)
  assert p < 1e-6


# ------------------------------------------------------------------- verify


def _held_out(rng, num_images=400, num_classes=10):
  images = rng.integers(0, 256, (num_images, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, num_classes, num_images)
  return images, labels


def test_verify_random_model_never_claims():
  rng = np.random.default_rng(9)
  images, labels = _held_out(rng)
  guess_rng = np.random.default_rng(10)

  def random_guess(batch):
    return guess_rng.integers(0, 10, len(batch))

  p_values = []
  for _ in range(60):
    result = verify.verify(
      random_guess,
      rng.bytes(32),
      images,
      labels,
      n_patterns=10,
      patch_size=4,
      num_classes=10,
      m=50,
      rng=rng,
    )
    assert not result["verified"]
    p_values.append(result["p_conditional"])
  assert min(p_values) > 1e-6
  assert np.mean(np.array(p_values) <= 0.5) < 0.75  # Not degenerate.


def test_verify_watermarked_model_is_verified_and_report_is_safe():
  rng = np.random.default_rng(11)
  images, labels = _held_out(rng)
  key = rng.bytes(32)
  patterns, pattern_labels = watermark.expand_key(key, 10, 4, 1, 10)
  trigger_to_label = {p.tobytes(): int(y) for p, y in zip(patterns, pattern_labels)}

  def watermarked_model(batch):
    return np.array([trigger_to_label.get(image[:4, :4].tobytes(), 0) for image in batch])

  result = verify.verify(
    watermarked_model,
    key,
    images,
    labels,
    n_patterns=10,
    patch_size=4,
    num_classes=10,
    m=40,
    rng=rng,
    batch_size=64,
  )
  assert result["verified"]
  assert result["k_majority"] == 10
  assert result["p_majority"] == pytest.approx(1e-10, rel=1e-12)
  assert result["p_conditional"] <= 1e-10
  assert result["acc_w"] == 1.0
  assert result["p_floor"] == 1e-10
  assert result["n_queries"] == 400
  assert result["pattern_label_hits"] == result["pattern_eligible_queries"]
  assert result["pattern_plurality_match"] == [1] * 10
  assert result["key_fingerprint"] == watermark.key_fingerprint(key)
  text = json.dumps(result)
  assert key.hex() not in text.lower() and key.hex()[:16] not in text.lower()
  assert json.loads(text) == result


@pytest.mark.parametrize("model", ["shifted", "reads_patch"])
def test_verify_is_valid_for_systematic_models_that_never_saw_the_key(model):
  # A clean classifier that is systematically wrong, or one that reacts to
  # the patch without knowing the labels, must not be accused more often than
  # alpha. (Drawing carriers only from classes != y_i would break this for the
  # shifted model: its counts would reveal y_i.)
  rng = np.random.default_rng(12)
  images, labels = _held_out(rng)
  label_of_image = {im[4:].tobytes(): int(y) for im, y in zip(images, labels)}

  def predict(batch):
    if model == "shifted":
      return np.array([(label_of_image[im[4:].tobytes()] + 1) % 10 for im in batch])
    return batch[:, 0, 0, 0].astype(np.int64) % 10

  trials, alpha = 200, 0.05
  p_values = [
    verify.verify(
      predict,
      rng.bytes(32),
      images,
      labels,
      n_patterns=10,
      patch_size=4,
      num_classes=10,
      m=60,
      alpha=alpha,
      rng=rng,
    )["p_conditional"]
    for _ in range(trials)
  ]
  false_claims = np.mean(np.array(p_values) <= alpha)
  assert false_claims <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / trials)


@pytest.mark.parametrize(
  "bad_output, message",
  [
    (lambda b: np.zeros(len(b), np.float32), "integer classes"),
    (lambda b: np.zeros(len(b) + 1, np.int64), "integer classes"),
    (lambda b: np.full(len(b), 10), r"outside \[0, 10\)"),
  ],
)
def test_verify_rejects_bad_predict_fn(bad_output, message):
  rng = np.random.default_rng(13)
  images, labels = _held_out(rng, 50)
  with pytest.raises(ValueError, match=message):
    verify.verify(
      bad_output, TEST_KEY, images, labels, n_patterns=3, patch_size=4, num_classes=10, m=5, rng=rng
    )


def test_verify_with_all_images_and_float_images_rejected():
  rng = np.random.default_rng(14)
  images, labels = _held_out(rng, 30)
  result = verify.verify(
    lambda b: np.zeros(len(b), np.int64),
    TEST_KEY,
    images,
    labels,
    n_patterns=3,
    patch_size=4,
    num_classes=10,
    m=None,
    rng=rng,
  )
  assert result["m"] is None and result["n_queries"] == 90
  with pytest.raises(TypeError, match="uint8"):
    verify.verify(
      lambda b: np.zeros(len(b), np.int64),
      TEST_KEY,
      images / 255.0,
      labels,
      n_patterns=3,
      patch_size=4,
      num_classes=10,
      m=5,
      rng=rng,
    )
  with pytest.raises(CCDDError, match="m = 31"):
    verify.verify(
      lambda b: np.zeros(len(b), np.int64),
      TEST_KEY,
      images,
      labels,
      n_patterns=3,
      patch_size=4,
      num_classes=10,
      m=31,
      rng=rng,
    )
