"""ccdd_jax.method.watermark: the key expansion, key files, stamping, D_W and trigger sets.

The exact tests and `verify` are tested in test_verify.py.
"""

import hashlib
import os
import stat

import numpy as np
import pytest

from ccdd_jax import CCDDError
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
