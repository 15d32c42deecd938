"""Tests for ccdd_jax.watermark."""

import collections
import fractions
import hashlib
import itertools
import json
import math
import os
import stat

import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.method import exact_tests
from ccdd_jax.method import verify
from ccdd_jax.method import watermark

TEST_KEY = bytes(range(32))

# Test vectors of docs/watermark-spec.md: key = bytes(range(32)), 6 patterns.
VECTOR_LABELS = {
  10: [0, 0, 0, 8, 8, 2],
  100: [0, 50, 50, 38, 48, 22],
  200: [0, 150, 50, 38, 48, 122],
}
VECTOR_FIRST_16_BYTES = [
  "a272cd105c3a2a086850601aae39deec",
  "90de742f1a914e28e8d1a8583e9f7f7e",
  "61ab6e8f6a011e6f248ba0017893c034",
  "d93d4ef56b492ed78a3d74f70f9cea8a",
  "e67538c06345346760c36f9fc7c129cb",
  "129a733e856e8eae5e5fab3b25dbcf70",
]
VECTOR_SHA256_16x16x3 = [
  "648cfe4a864d0e4f90949c1df2464ffba0a7e9fa827e505906ecd28ec042d5f8",
  "fc235d422d0ab3e378019354709de49e279958225a66f41294594ebbc4f478d2",
  "7633dd9003cf6249d675dd2f781052210893879f8ce12b73f0056bf2688b300a",
  "852ab068dbef7ceaf357ea723908e59ae6645a9b7ed9c1c6d5dff1b18f9be2f1",
  "3c140924dc73369376d9db5a77f9d4d5d99ce6b27df64a67810def2a4d3ed054",
  "5d3cd4594ebaa2977202e02ce5933c1581d43273ece20a7494f3163a6e957ef2",
]


def _spec_expand(key, n_patterns, patch_size, channels, num_classes):
  """The key expansion written from the spec's text, not from the module."""
  size = patch_size * patch_size * channels
  link, patterns, labels = bytes(32), [], []
  for _ in range(n_patterns):
    stream, counter = b"", 0
    while counter == 0 or len(stream) < size:
      stream += hashlib.sha256(b"ccdd/H_x\x00" + key + link + counter.to_bytes(4, "big")).digest()
      counter += 1
    link = stream[:32]
    patterns.append(stream[:size])
    label_digest = hashlib.sha256(b"ccdd/H_y\x00" + key + link).digest()
    labels.append(int.from_bytes(label_digest[:16], "big") % num_classes)
  return patterns, labels


# ---------------------------------------------------------------- key expansion


@pytest.mark.parametrize("num_classes", [10, 100, 200])
def test_expand_key_test_vectors_4x4x1(num_classes):
  patterns, labels = watermark.expand_key(TEST_KEY, 6, 4, 1, num_classes)
  assert patterns.shape == (6, 4, 4, 1) and patterns.dtype == np.uint8
  assert labels.shape == (6,) and labels.dtype == np.int64
  assert [p.tobytes().hex() for p in patterns] == VECTOR_FIRST_16_BYTES
  assert labels.tolist() == VECTOR_LABELS[num_classes]


def test_expand_key_test_vectors_16x16x3():
  patterns, labels = watermark.expand_key(TEST_KEY, 6, 16, 3, 10)
  assert patterns.shape == (6, 16, 16, 3)
  assert [p.tobytes()[:16].hex() for p in patterns] == VECTOR_FIRST_16_BYTES
  assert [hashlib.sha256(p.tobytes()).hexdigest() for p in patterns] == VECTOR_SHA256_16x16x3
  assert labels.tolist() == VECTOR_LABELS[10]
  # Row-major [row, column, channel]: pixel (0, 1) holds stream bytes 3..5.
  stream = patterns[0].tobytes()
  np.testing.assert_array_equal(patterns[0, 0, 1], list(stream[3:6]))


@pytest.mark.parametrize("shape", [(4, 1, 10), (16, 3, 10), (7, 2, 13), (32, 3, 200)])
def test_expand_key_follows_the_written_spec(shape):
  patch_size, channels, num_classes = shape
  key = hashlib.sha256(repr(shape).encode()).digest()
  patterns, labels = watermark.expand_key(key, 5, patch_size, channels, num_classes)
  spec_patterns, spec_labels = _spec_expand(key, 5, patch_size, channels, num_classes)
  assert [p.tobytes() for p in patterns] == spec_patterns
  assert labels.tolist() == spec_labels


def test_hash_chain_links_follow_eq_3():
  patterns, _ = watermark.expand_key(TEST_KEY, 3, 16, 3, 10)
  previous = bytes(32)  # W_0.
  for pattern in patterns:
    stream = pattern.tobytes()
    # W_{i+1} = H_x(Key, W_i) is block 0; blocks 1..23 continue the counter.
    assert stream[:32] == watermark.h_x(TEST_KEY, previous, 0)
    assert stream[32:64] == watermark.h_x(TEST_KEY, previous, 1)
    assert stream[-32:] == watermark.h_x(TEST_KEY, previous, 23)
    previous = stream[:32]


def test_domain_separation():
  link = bytes(32)
  for _ in range(20):
    assert watermark.h_x(TEST_KEY, link, 0) != watermark.h_y(TEST_KEY, link)
    assert watermark.h_x(TEST_KEY, link, 0)[:16] != (watermark.h_y(TEST_KEY, link)[:16])
    link = watermark.h_x(TEST_KEY, link, 0)
  # Same key and message with no tag, or the other tag, give other digests.
  untagged = hashlib.sha256(TEST_KEY + bytes(32)).digest()
  assert untagged not in (watermark.h_x(TEST_KEY, bytes(32), 0), watermark.h_y(TEST_KEY, bytes(32)))
  assert watermark.H_X_TAG != watermark.H_Y_TAG


def test_expand_key_depends_on_key_and_is_deterministic():
  other_key = bytes(31) + b"\x01"
  a_patterns, a_labels = watermark.expand_key(TEST_KEY, 50, 4, 1, 10)
  b_patterns, b_labels = watermark.expand_key(TEST_KEY, 50, 4, 1, 10)
  c_patterns, c_labels = watermark.expand_key(other_key, 50, 4, 1, 10)
  np.testing.assert_array_equal(a_patterns, b_patterns)
  np.testing.assert_array_equal(a_labels, b_labels)
  assert not np.any(np.all(a_patterns == c_patterns, axis=(1, 2, 3)))
  assert not np.array_equal(a_labels, c_labels)


@pytest.mark.parametrize("num_classes", [10, 7])
def test_labels_are_roughly_uniform(num_classes):
  _, labels = watermark.expand_key(TEST_KEY, 10_000, 1, 1, num_classes)
  observed = np.bincount(labels, minlength=num_classes)
  expected = labels.size / num_classes
  chi_square = float(((observed - expected) ** 2 / expected).sum())
  # 99.999th percentile of chi-square with 9 (resp. 6) degrees: 37.3 (31.8).
  assert chi_square < 30.0, observed


def test_pattern_bytes_are_roughly_uniform():
  patterns, _ = watermark.expand_key(TEST_KEY, 20, 16, 3, 10)
  observed = np.bincount(patterns.ravel(), minlength=256)
  expected = patterns.size / 256
  chi_square = float(((observed - expected) ** 2 / expected).sum())
  assert chi_square < 400.0  # 255 degrees of freedom; 99.999th pct ~ 370.


@pytest.mark.parametrize("bad_key", [bytes(31), bytes(33), "00" * 32, None])
def test_expand_key_rejects_bad_keys(bad_key):
  with pytest.raises(ValueError, match="must be 32 bytes"):
    watermark.expand_key(bad_key, 3, 4, 1, 10)


@pytest.mark.parametrize(
  "args", [(0, 4, 1, 10), (3, 0, 1, 10), (3, 4, 0, 10), (3, 4, 1, 1), (3, 4.0, 1, 10)]
)
def test_expand_key_rejects_bad_sizes(args):
  with pytest.raises((ValueError, TypeError)):
    watermark.expand_key(TEST_KEY, *args)


# ---------------------------------------------------------- keys and key files


def test_generate_key_is_32_fresh_bytes():
  keys = {watermark.generate_key() for _ in range(8)}
  assert len(keys) == 8
  assert all(isinstance(k, bytes) and len(k) == 32 for k in keys)


def test_key_fingerprint():
  fingerprint = watermark.key_fingerprint(TEST_KEY)
  assert fingerprint == "15f07d5cecd7006f"
  assert fingerprint == hashlib.sha256(b"ccdd/fingerprint\x00" + TEST_KEY).hexdigest()[:16]
  assert fingerprint not in TEST_KEY.hex()
  assert watermark.key_fingerprint(bytes(32)) != fingerprint


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277])
def test_write_key_file_mode_0600_and_round_trip(tmp_path, umask):
  key = watermark.generate_key()
  path = tmp_path / "owner.key"
  old_umask = os.umask(umask)
  try:
    watermark.write_key_file(path, key)
  finally:
    os.umask(old_umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert path.read_text() == key.hex() + "\n"
  assert watermark.read_key_file(path) == key
  assert watermark.read_key_file(str(path)) == key


def test_write_key_file_refuses_to_overwrite(tmp_path):
  path = tmp_path / "owner.key"
  path.write_text("precious\n")
  with pytest.raises(CCDDError, match=r"already exists; refusing to overwrite"):
    watermark.write_key_file(path, TEST_KEY)
  assert path.read_text() == "precious\n"


def test_write_key_file_into_missing_directory(tmp_path):
  with pytest.raises(CCDDError, match="cannot create key file"):
    watermark.write_key_file(tmp_path / "absent" / "owner.key", TEST_KEY)


def test_read_key_file_missing(tmp_path):
  with pytest.raises(CCDDError, match=r"^key file .*absent\.key does not exist$"):
    watermark.read_key_file(tmp_path / "absent.key")


def test_read_key_file_unreadable(tmp_path):
  with pytest.raises(CCDDError, match="^cannot read key file"):
    watermark.read_key_file(tmp_path)  # A directory.


@pytest.mark.parametrize(
  "content",
  [
    b"",
    b"\n",
    TEST_KEY.hex()[:-2].encode() + b"\n",
    TEST_KEY.hex().encode() + b"00\n",
    b"zz" + TEST_KEY.hex()[2:].encode(),
    TEST_KEY,
    TEST_KEY.hex().encode() + b" " * 5000 + b"00",
    TEST_KEY.hex()[:32].encode() + b" " + TEST_KEY.hex()[32:].encode(),
  ],
)
def test_read_key_file_corrupt(tmp_path, content):
  path = tmp_path / "owner.key"
  path.write_bytes(content)
  with pytest.raises(CCDDError) as error:
    watermark.read_key_file(path)
  message = str(error.value)
  assert message.endswith("does not hold a 32-byte key as 64 hex digits")
  assert "\n" not in message and TEST_KEY.hex() not in message


def test_read_key_file_accepts_upper_case_and_surrounding_space(tmp_path):
  path = tmp_path / "owner.key"
  path.write_text("  " + TEST_KEY.hex().upper() + "\r\n")
  assert watermark.read_key_file(path) == TEST_KEY


# ------------------------------------------------------------------- stamping


def test_stamp_replaces_exactly_the_top_left_patch():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 8, 9, 3), dtype=np.uint8)
  original = images.copy()
  patterns = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  pattern_ids = np.array([1, 0, 1, 1, 0])
  stamped = watermark.stamp(images, patterns, pattern_ids)
  assert stamped.dtype == np.uint8 and stamped.shape == images.shape
  np.testing.assert_array_equal(images, original)  # Input untouched.
  for j, pattern_id in enumerate(pattern_ids):
    np.testing.assert_array_equal(stamped[j, :4, :4], patterns[pattern_id])
    outside = np.ones((8, 9), bool)
    outside[:4, :4] = False
    np.testing.assert_array_equal(stamped[j][outside], images[j][outside])


def test_stamp_whole_image_patch_is_allowed():
  images = np.zeros((1, 4, 4, 1), np.uint8)
  patterns = np.full((1, 4, 4, 1), 7, np.uint8)
  assert np.all(watermark.stamp(images, patterns, [0]) == 7)


@pytest.mark.parametrize(
  "images, patterns, ids, message",
  [
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((1, 9, 9, 3), np.uint8), [0, 0], "does not fit"),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((1, 4, 4, 1), np.uint8), [0, 0], "channels"),
    (np.zeros((2, 8, 8, 3), np.float32), np.zeros((1, 4, 4, 3), np.uint8), [0, 0], "uint8"),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8), [0, 1], "pattern_ids"),
    (np.zeros((2, 8, 8, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8), [0], "pattern_ids"),
    (np.zeros((8, 8, 3), np.uint8), np.zeros((1, 4, 4, 3), np.uint8), [0], r"\[N, H, W, C\]"),
  ],
)
def test_stamp_rejects_bad_shapes(images, patterns, ids, message):
  with pytest.raises((ValueError, TypeError), match=message):
    watermark.stamp(images, patterns, ids)


# ----------------------------------------------------------- D_W and queries


def _indexed_images(num_images, num_classes, rng):
  """Images 8x8x1 whose bottom row encodes their index (outside the patch)."""
  images = rng.integers(0, 256, (num_images, 8, 8, 1), dtype=np.uint8)
  images[:, 7, 0, 0] = np.arange(num_images) % 256
  images[:, 7, 1, 0] = np.arange(num_images) // 256
  labels = rng.integers(0, num_classes, num_images)
  return images, labels


def _carrier_index(images):
  return images[:, 7, 0, 0].astype(int) + 256 * images[:, 7, 1, 0].astype(int)


def test_make_watermark_set_properties():
  rng = np.random.default_rng(1)
  images, labels = _indexed_images(1000, 10, rng)
  patterns, pattern_labels = watermark.expand_key(TEST_KEY, 6, 4, 1, 10)
  pattern_labels = np.array([0, 1, 2, 3, 4, 5])  # Distinct targets.
  images_w, labels_w, pattern_ids = watermark.make_watermark_set(
    images, labels, patterns, pattern_labels, 0.1, np.random.default_rng(2)
  )
  assert images_w.shape == (100, 8, 8, 1) and images_w.dtype == np.uint8
  assert labels_w.dtype == np.int64 and pattern_ids.dtype == np.int64
  np.testing.assert_array_equal(labels_w, pattern_labels[pattern_ids])
  per_pattern = np.bincount(pattern_ids, minlength=6)
  assert per_pattern.max() - per_pattern.min() <= 1
  carriers = _carrier_index(images_w)
  assert len(set(carriers.tolist())) == 100  # Without replacement.
  assert np.all(labels[carriers] != labels_w)  # Carrier class != target.
  np.testing.assert_array_equal(images_w[:, :4, :4], patterns[pattern_ids])
  np.testing.assert_array_equal(images_w[:, 4:], images[carriers, 4:])
  np.testing.assert_array_equal(images_w[:, :4, 4:], images[carriers, :4, 4:])
  # Same generator seed, same set.
  again = watermark.make_watermark_set(
    images, labels, patterns, pattern_labels, 0.1, np.random.default_rng(2)
  )
  np.testing.assert_array_equal(again[0], images_w)


@pytest.mark.parametrize(
  "num_images, ratio, size",
  [(15, 0.1, 2), (1000, 0.1, 100), (7, 0.0, 0), (7, 1.0, 7), (999, 0.25, 250)],
)
def test_make_watermark_set_size(num_images, ratio, size):
  rng = np.random.default_rng(3)
  images, labels = _indexed_images(num_images, 10, rng)
  labels[:] = 9  # Every image is eligible for targets 0..2.
  patterns = rng.integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
  images_w, labels_w, pattern_ids = watermark.make_watermark_set(
    images, labels, patterns, np.array([0, 1, 2]), ratio, rng
  )
  assert len(images_w) == len(labels_w) == len(pattern_ids) == size


def test_make_watermark_set_errors():
  rng = np.random.default_rng(4)
  images, _ = _indexed_images(50, 10, rng)
  patterns = rng.integers(0, 256, (2, 4, 4, 1), dtype=np.uint8)
  with pytest.raises(CCDDError, match="outside class 0"):
    watermark.make_watermark_set(images, np.zeros(50, int), patterns, np.array([0, 0]), 0.1, rng)
  with pytest.raises(ValueError, match="ratio"):
    watermark.make_watermark_set(images, np.ones(50, int), patterns, np.array([0, 0]), 1.5, rng)


def test_trigger_set_properties():
  rng = np.random.default_rng(5)
  images, labels = _indexed_images(300, 10, rng)
  patterns, pattern_labels = watermark.expand_key(TEST_KEY, 4, 4, 1, 10)
  images_q, pattern_ids = watermark.trigger_set(images, labels, patterns, pattern_labels, 20, rng)
  assert images_q.shape == (80, 8, 8, 1)
  np.testing.assert_array_equal(pattern_ids, np.repeat(np.arange(4), 20))
  carriers = _carrier_index(images_q).reshape(4, 20)
  for i in range(4):
    assert len(set(carriers[i].tolist())) == 20
    assert np.all(labels[carriers[i]] != pattern_labels[i])
  np.testing.assert_array_equal(images_q[:, :4, :4], patterns[pattern_ids])
  # m = None: every eligible image, so per-pattern counts differ.
  images_all, ids_all = watermark.trigger_set(images, labels, patterns, pattern_labels, None, rng)
  expected = [int(np.sum(labels != y)) for y in pattern_labels]
  assert np.bincount(ids_all, minlength=4).tolist() == expected
  assert len(images_all) == sum(expected)
  with pytest.raises(CCDDError, match="m = 1000 requested"):
    watermark.trigger_set(images, labels, patterns, pattern_labels, 1000, rng)


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


def test_trigger_visibility_is_one_for_stamped_copies_and_low_for_noise():
  rng = np.random.default_rng(0)
  patterns = rng.integers(0, 256, size=(3, 4, 4, 1), dtype=np.uint8)
  images = rng.integers(0, 256, size=(50, 8, 8, 1), dtype=np.uint8)
  stamped = watermark.stamp(images[:5], patterns, np.array([0, 1, 2, 0, 1]))
  np.testing.assert_allclose(watermark.trigger_visibility(stamped, patterns), 1.0, atol=1e-9)
  # Unrelated corners: 16-dimensional random vectors rarely align (max of 3 cosines).
  assert watermark.trigger_visibility(images, patterns).mean() < 0.5
  # Float pixels in [0, 1] give the same answer as uint8.
  np.testing.assert_allclose(
    watermark.trigger_visibility(stamped / 255.0, patterns), 1.0, atol=1e-9
  )
