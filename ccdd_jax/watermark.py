"""Keyed backdoor watermark of CCDD: key, patterns, D_W, queries, verification.

Stage I of the paper (eq. 3) derives n trigger patterns W_i and target labels
y_i from a secret key with a SHA-256 hash chain; the experts are trained on
D_C ∪ D_W, where D_W holds clean images stamped with a pattern on their
top-left corner and relabelled with that pattern's label. Stage III queries a
suspect model with stamped held-out images. The paper's acceptance rule
(eq. 11 with n = 10, tau = 1) accepts a random model with probability
1 - 0.9^10 ≈ 0.65, so `verify` decides with an exact test instead.
docs/watermark-spec.md specifies every byte and argues why each test is exact.

Everything here is host-side NumPy: pure functions, randomness only from the
`np.random.Generator` passed in. The key is never printed, logged or put in a
report; `key_fingerprint` names it safely.
"""

from collections.abc import Callable
import fractions
import hashlib
import math
import operator
import os
import re
import secrets

import numpy as np

from ccdd_jax import CCDDError

KEY_BYTES = 32
LINK_BYTES = 32  # One SHA-256 digest: the chain state W_i of eq. 3.
LABEL_BYTES = 16  # Bytes of H_y read as the label integer (skew < 2^-100).
H_X_TAG = b"ccdd/H_x\x00"
H_Y_TAG = b"ccdd/H_y\x00"
FINGERPRINT_TAG = b"ccdd/fingerprint\x00"
CHAIN_START = bytes(LINK_BYTES)  # W_0: 32 zero bytes.

_HEX_KEY = re.compile(rb"[0-9a-fA-F]{%d}" % (2 * KEY_BYTES))
_MAX_KEY_FILE_BYTES = 4096


# ----------------------------------------------------------------------------
# Keys and key files.
# ----------------------------------------------------------------------------


def generate_key() -> bytes:
  """Returns a fresh 32-byte watermark key from the OS's CSPRNG."""
  return secrets.token_bytes(KEY_BYTES)


def _check_key(key) -> bytes:
  if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
    raise ValueError(f"a watermark key must be {KEY_BYTES} bytes")
  return bytes(key)


def key_commitment(key: bytes) -> str:
  """Returns hex(SHA-256(FINGERPRINT_TAG‖key)): 64 digits to publish; binds, never reveals."""
  key = _check_key(key)
  return hashlib.sha256(FINGERPRINT_TAG + key).hexdigest()


def key_fingerprint(key: bytes) -> str:
  """Returns 16 hex digits that name `key` safely in reports (`key_commitment`'s prefix)."""
  return key_commitment(key)[:16]


def write_key_file(path: str | os.PathLike, key: bytes) -> None:
  """Writes `key` as 64 hex digits and a newline to a new file of mode 0600."""
  key = _check_key(key)
  path = os.fspath(path)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  except FileExistsError:
    raise CCDDError(f"key file {path} already exists; refusing to overwrite it") from None
  except OSError as e:
    raise CCDDError(f"cannot create key file {path}: {e.strerror or e}") from None
  data = (key.hex() + "\n").encode("ascii")
  try:
    os.fchmod(fd, 0o600)  # The umask may have cleared owner bits.
    written = 0
    while written < len(data):
      written += os.write(fd, data[written:])
    os.fsync(fd)  # A lost key is a lost watermark.
  except OSError as e:
    os.close(fd)
    os.unlink(path)  # A partial key file would block the retry.
    raise CCDDError(f"cannot write key file {path}: {e.strerror or e}") from None
  os.close(fd)


def read_key_file(path: str | os.PathLike) -> bytes:
  """Reads a key written by `write_key_file`."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      text = f.read(_MAX_KEY_FILE_BYTES + 1)
  except FileNotFoundError:
    raise CCDDError(f"key file {path} does not exist") from None
  except OSError as e:
    raise CCDDError(f"cannot read key file {path}: {e.strerror or e}") from None
  text = text.strip() if len(text) <= _MAX_KEY_FILE_BYTES else b""
  if not _HEX_KEY.fullmatch(text):
    raise CCDDError(
      f"key file {path} does not hold a {KEY_BYTES}-byte key as {2 * KEY_BYTES} hex digits"
    )
  return bytes.fromhex(text.decode("ascii"))


# ----------------------------------------------------------------------------
# Key expansion (Stage I, eq. 3).
# ----------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int) -> int:
  try:
    value = operator.index(value)
  except TypeError:
    raise TypeError(f"{name} must be an integer, got {value!r}") from None
  if value < minimum:
    raise ValueError(f"{name} must be at least {minimum}, got {value}")
  return value


def h_x(key: bytes, link: bytes, counter: int) -> bytes:
  """Block `counter` of H_x(Key, W) in eq. 3: SHA-256(tag‖key‖link‖counter)."""
  if len(link) != LINK_BYTES or not 0 <= counter < 2**32:
    raise ValueError("h_x takes a 32-byte link and a counter in [0, 2^32)")
  return hashlib.sha256(H_X_TAG + _check_key(key) + link + counter.to_bytes(4, "big")).digest()


def h_y(key: bytes, link: bytes) -> bytes:
  """H_y(Key, W) in eq. 3: SHA-256(H_Y_TAG‖key‖link)."""
  if len(link) != LINK_BYTES:
    raise ValueError("h_y takes a 32-byte link")
  return hashlib.sha256(H_Y_TAG + _check_key(key) + link).digest()


def expand_key(
  key: bytes, n_patterns: int, patch_size: int, channels: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
  """Derives patterns uint8 [n, p, p, C] and labels int64 [n] (eq. 3)."""
  key = _check_key(key)
  n_patterns = _check_int("n_patterns", n_patterns, 1)
  patch_size = _check_int("patch_size", patch_size, 1)
  channels = _check_int("channels", channels, 1)
  num_classes = _check_int("num_classes", num_classes, 2)
  pattern_bytes = patch_size * patch_size * channels
  n_blocks = -(-pattern_bytes // LINK_BYTES)
  patterns = np.empty((n_patterns, pattern_bytes), np.uint8)
  labels = np.empty(n_patterns, np.int64)
  link = CHAIN_START
  for i in range(n_patterns):
    # Counter-mode output of H_x on the previous link; block 0 is the new link.
    stream = b"".join(h_x(key, link, c) for c in range(n_blocks))
    link = stream[:LINK_BYTES]
    patterns[i] = np.frombuffer(stream, np.uint8, count=pattern_bytes)
    label_int = int.from_bytes(h_y(key, link)[:LABEL_BYTES], "big")
    labels[i] = label_int % num_classes
  return patterns.reshape(n_patterns, patch_size, patch_size, channels), labels


# ----------------------------------------------------------------------------
# Stamping, D_W and trigger sets.
# ----------------------------------------------------------------------------


def _check_uint8_images(images, name: str = "images") -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"{name} must have shape [N, H, W, C], got {images.shape}")
  if images.dtype != np.uint8:
    raise TypeError(f"{name} must be uint8 pixels (stamp before normalising), got {images.dtype}")
  return images


def _check_labels(labels, size: int, num_classes: int, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (size,) or (size and labels.dtype.kind not in "iu"):
    raise ValueError(f"{name} must be {size} integers, got {labels.dtype} {labels.shape}")
  labels = labels.astype(np.int64)
  if size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes})")
  return labels


def stamp(images: np.ndarray, patterns: np.ndarray, pattern_ids: np.ndarray) -> np.ndarray:
  """Returns `images` with patterns[pattern_ids[j]] over image j's top left."""
  images = _check_uint8_images(images)
  patterns = _check_uint8_images(patterns, "patterns")
  n_patterns, p, p_w, channels = patterns.shape
  if p != p_w:
    raise ValueError(f"patterns must be square, got {p}x{p_w}")
  if p > images.shape[1] or p > images.shape[2]:
    raise ValueError(f"a {p}x{p} patch does not fit {images.shape[1]}x{images.shape[2]} images")
  if channels != images.shape[3]:
    raise ValueError(f"patterns have {channels} channels but images have {images.shape[3]}")
  pattern_ids = _check_labels(pattern_ids, len(images), n_patterns, "pattern_ids")
  stamped = images.copy()
  stamped[:, :p, :p, :] = patterns[pattern_ids]
  return stamped


def corner_mask(image_shape: tuple, patch: int) -> np.ndarray:
  """float32 [1, H, W, 1]: 1 on the top-left patch x patch corner, where `stamp` puts triggers."""
  mask = np.zeros((1, image_shape[0], image_shape[1], 1), np.float32)
  mask[:, :patch, :patch, :] = 1.0
  return mask


def _check_pattern_set(images, labels, patterns, pattern_labels):
  images = _check_uint8_images(images)
  patterns = _check_uint8_images(patterns, "patterns")
  if not len(patterns):
    raise ValueError("at least one pattern is needed")
  labels = _check_labels(labels, len(images), np.iinfo(np.int64).max, "labels")
  pattern_labels = _check_labels(
    pattern_labels, len(patterns), np.iinfo(np.int64).max, "pattern_labels"
  )
  return images, labels, patterns, pattern_labels


def make_watermark_set(
  images: np.ndarray,
  labels: np.ndarray,
  patterns: np.ndarray,
  pattern_labels: np.ndarray,
  ratio: float,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Builds D_W (Stage I): round(ratio·N) stamped, relabelled carriers."""
  images, labels, patterns, pattern_labels = _check_pattern_set(
    images, labels, patterns, pattern_labels
  )
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"the watermark ratio |D_W|/|D_C| must lie in [0, 1], got {ratio}")
  size = math.floor(ratio * len(images) + 0.5)
  # Round-robin over a random permutation: counts differ by at most one.
  pattern_ids = rng.permutation(len(patterns))[np.arange(size) % len(patterns)]
  carrier_ids = np.empty(size, np.int64)
  shuffled = rng.permutation(len(images))
  unused = np.ones(len(images), bool)
  for i, target in enumerate(pattern_labels):
    slots = np.flatnonzero(pattern_ids == i)
    pool = shuffled[unused[shuffled] & (labels[shuffled] != target)]
    if pool.size < slots.size:
      raise CCDDError(
        f"only {pool.size} unused images lie outside class "
        f"{target} to carry pattern {i}; {slots.size} needed"
      )
    carrier_ids[slots] = pool[: slots.size]
    unused[pool[: slots.size]] = False
  images_w = stamp(images[carrier_ids], patterns, pattern_ids)
  return images_w, pattern_labels[pattern_ids], pattern_ids.astype(np.int64)


def trigger_set(
  images: np.ndarray,
  labels: np.ndarray,
  patterns: np.ndarray,
  pattern_labels: np.ndarray,
  m: int | None,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """Stamps held-out images of other classes with each pattern (for Acc_W).

  Returns flat arrays (images_q uint8 [Q, H, W, C], pattern_ids int64 [Q]),
  pattern-major: pattern i's queries come before pattern i + 1's. With m given
  Q = n·m and `images_q.reshape(n, m, H, W, C)` groups them by pattern; with
  m None every image whose class differs from y_i carries pattern i.

  The carriers depend on the labels y_i, so do not feed these counts to the
  hypothesis tests; `verify` draws its queries independently of the labels.
  """
  images, labels, patterns, pattern_labels = _check_pattern_set(
    images, labels, patterns, pattern_labels
  )
  if m is not None:
    m = _check_int("m", m, 1)
  carrier_ids = []
  for i, target in enumerate(pattern_labels):
    eligible = np.flatnonzero(labels != target)
    if m is None:
      carrier_ids.append(eligible)
    elif eligible.size < m:
      raise CCDDError(
        f"only {eligible.size} images lie outside class {target} for pattern {i}; m = {m} requested"
      )
    else:
      carrier_ids.append(rng.choice(eligible, size=m, replace=False))
  pattern_ids = np.repeat(np.arange(len(patterns)), [ids.size for ids in carrier_ids])
  carrier_ids = np.concatenate(carrier_ids)
  return stamp(images[carrier_ids], patterns, pattern_ids), pattern_ids


def verification_queries(
  num_images: int, n_patterns: int, m: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Draws m carriers per pattern, independently of the key's labels.

  Returns (carrier_ids int64 [Q], pattern_ids int64 [Q]), pattern-major; m
  None means every image carries every pattern.
  """
  num_images = _check_int("the number of held-out images", num_images, 1)
  n_patterns = _check_int("n_patterns", n_patterns, 1)
  if m is None:
    carrier_ids = np.tile(np.arange(num_images), n_patterns)
  else:
    m = _check_int("m", m, 1)
    if m > num_images:
      raise CCDDError(f"m = {m} queries per pattern but only {num_images} held-out images")
    carrier_ids = np.concatenate(
      [rng.choice(num_images, size=m, replace=False) for _ in range(n_patterns)]
    )
  pattern_ids = np.repeat(np.arange(n_patterns), carrier_ids.size // n_patterns)
  return carrier_ids.astype(np.int64), pattern_ids


def trigger_visibility(pixels: np.ndarray, patterns: np.ndarray) -> np.ndarray:
  """How much each image's top-left corner looks like a trigger: max over patterns of
  the cosine similarity of the mean-centred corner and pattern (1 = a stamped copy).

  `pixels` are images in [0, 1] or uint8 [N, H, W, C]; returns float [N].
  """
  patterns = _check_uint8_images(patterns, "patterns").astype(np.float64)
  p = patterns.shape[1]
  pixels = np.asarray(pixels, np.float64)
  if pixels.max() > 1.0:
    pixels = pixels / 255.0
  corners = pixels[:, :p, :p, :].reshape(len(pixels), -1)
  flat = (patterns / 255.0).reshape(len(patterns), -1)
  corners = corners - corners.mean(axis=1, keepdims=True)
  flat = flat - flat.mean(axis=1, keepdims=True)
  norms = np.linalg.norm(corners, axis=1, keepdims=True) * np.linalg.norm(flat, axis=1)
  return np.max(corners @ flat.T / np.maximum(norms, 1e-12), axis=1)


# ----------------------------------------------------------------------------
# Statistics (Stage III; replaces eq. 11).
# ----------------------------------------------------------------------------


def _check_predictions(predictions, pattern_ids, n_patterns, num_classes, carrier_labels):
  pattern_ids = np.asarray(pattern_ids)
  predictions = _check_labels(predictions, pattern_ids.size, num_classes, "predictions")
  pattern_ids = _check_labels(pattern_ids, predictions.size, n_patterns, "pattern_ids")
  if carrier_labels is not None:
    carrier_labels = _check_labels(carrier_labels, predictions.size, num_classes, "carrier_labels")
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
  n_patterns = _check_int("n_patterns", n_patterns, 1)
  num_classes = _check_int("num_classes", num_classes, 2)
  predictions, pattern_ids, carrier_labels = _check_predictions(
    predictions, pattern_ids, n_patterns, num_classes, carrier_labels
  )
  if carrier_labels is not None:
    counted = predictions != carrier_labels
    predictions, pattern_ids = predictions[counted], pattern_ids[counted]
  flat = np.bincount(pattern_ids * num_classes + predictions, minlength=n_patterns * num_classes)
  return flat.reshape(n_patterns, num_classes).astype(np.int64)


def watermark_accuracy(
  predictions: np.ndarray,
  pattern_ids: np.ndarray,
  pattern_labels: np.ndarray,
  carrier_labels: np.ndarray | None = None,
) -> float:
  """Acc_W: the fraction of trigger queries predicted as their pattern's label.

  With `carrier_labels`, queries whose own class is the pattern's label are
  left out (`trigger_set` never draws them).
  """
  pattern_labels = np.asarray(pattern_labels)
  num_classes = np.iinfo(np.int64).max
  predictions, pattern_ids, carrier_labels = _check_predictions(
    predictions, pattern_ids, pattern_labels.size, num_classes, carrier_labels
  )
  targets = _check_labels(pattern_labels, pattern_labels.size, num_classes, "pattern_labels")[
    pattern_ids
  ]
  if carrier_labels is not None:
    kept = carrier_labels != targets
    predictions, targets = predictions[kept], targets[kept]
  if not predictions.size:
    raise ValueError("Acc_W needs at least one trigger query")
  return float(np.mean(predictions == targets))


def _check_counts(counts, labels) -> tuple[np.ndarray, np.ndarray]:
  counts = np.asarray(counts)
  if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 2:
    raise ValueError(f"counts must have shape [n >= 1, C >= 2], got {counts.shape}")
  if counts.dtype.kind not in "iu" or counts.min() < 0:
    raise ValueError("counts must be non-negative integers")
  labels = _check_labels(labels, counts.shape[0], counts.shape[1], "labels")
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
  k = _check_int("k", k, 0)
  n = _check_int("n", n, 0)
  num_classes = _check_int("num_classes", num_classes, 2)
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


def decide(
  predictions: np.ndarray,
  pattern_ids: np.ndarray,
  carrier_labels: np.ndarray,
  pattern_labels: np.ndarray,
  *,
  num_classes: int,
  alpha: float = 1e-6,
) -> dict:
  """Both exact tests and the verdict on a suspect's answers to keyed queries.

  The one place the statistics are computed, for `verify` (white box) and for
  answers read from a file (`blackbox.verify_predictions`).

  Args:
    predictions: the suspect's class for each query, integers [Q].
    pattern_ids: the pattern each query carries [Q].
    carrier_labels: each query's own class [Q]; a query predicted as its own
      class is not counted (docs/watermark-spec.md, section 6.1).
    pattern_labels: the key's labels y_i [n].
    num_classes: C.
    alpha: the false-claim probability allowed; `verified` is p_conditional <=
      alpha.

  Returns:
    `verify`'s dict without `key_fingerprint` and `m`.
  """
  num_classes = _check_int("num_classes", num_classes, 2)
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  pattern_labels = np.asarray(pattern_labels)
  n_patterns = _check_int("n_patterns", pattern_labels.size, 1)
  pattern_labels = _check_labels(pattern_labels, n_patterns, num_classes, "pattern_labels")
  predictions, pattern_ids, carrier_labels = _check_predictions(
    predictions, pattern_ids, n_patterns, num_classes, carrier_labels
  )
  if carrier_labels is None:
    raise ValueError("decide needs each query's carrier_labels")
  counts = pattern_counts(
    predictions, pattern_ids, n_patterns, num_classes, carrier_labels=carrier_labels
  )
  matches = plurality_matches(counts, pattern_labels)
  label_hits = counts[np.arange(n_patterns), pattern_labels]
  eligible = carrier_labels != pattern_labels[pattern_ids]
  eligible_per_pattern = np.bincount(pattern_ids[eligible], minlength=n_patterns)
  k_majority = int(matches.sum())
  p_conditional = conditional_label_pvalue(counts, pattern_labels)
  return {
    "n_patterns": int(n_patterns),
    "num_classes": int(num_classes),
    "n_queries": int(predictions.size),
    "n_eligible_queries": int(eligible.sum()),
    "k_majority": k_majority,
    "p_majority": majority_binomial_pvalue(k_majority, n_patterns, num_classes),
    "t_conditional": int(label_hits.sum()),
    "p_conditional": p_conditional,
    "alpha": float(alpha),
    "p_floor": p_floor(num_classes, n_patterns),
    "verified": bool(p_conditional <= alpha),
    "acc_w": (float(label_hits.sum() / eligible.sum()) if eligible.any() else 0.0),
    "pattern_eligible_queries": [int(c) for c in eligible_per_pattern],
    "pattern_label_hits": [int(c) for c in label_hits],
    "pattern_plurality_match": [int(b) for b in matches],
  }


# ----------------------------------------------------------------------------
# Verification (Stage III).
# ----------------------------------------------------------------------------


def _predict_queries(
  predict_fn, images, carrier_ids, patterns, pattern_ids, num_classes, batch_size
) -> np.ndarray:
  predictions = np.empty(carrier_ids.size, np.int64)
  for start in range(0, carrier_ids.size, batch_size):
    batch = slice(start, start + batch_size)
    queries = stamp(images[carrier_ids[batch]], patterns, pattern_ids[batch])
    answer = np.asarray(predict_fn(queries))
    if answer.shape != (len(queries),) or answer.dtype.kind not in "iu":
      raise ValueError(
        f"predict_fn must return {len(queries)} integer classes "
        f"for {len(queries)} images, got {answer.dtype} "
        f"{answer.shape}"
      )
    if answer.min() < 0 or answer.max() >= num_classes:
      raise ValueError(f"predict_fn returned a class outside [0, {num_classes})")
    predictions[batch] = answer
  return predictions


def verify(
  predict_fn: Callable[[np.ndarray], np.ndarray],
  key: bytes,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  n_patterns: int,
  patch_size: int,
  num_classes: int,
  m: int | None,
  alpha: float = 1e-6,
  rng: np.random.Generator,
  batch_size: int = 1024,
) -> dict:
  """Stage III: queries a suspect model with keyed triggers and tests them.

  Args:
    predict_fn: maps uint8 stamped images [B, H, W, C] to integer classes [B];
      the caller wraps normalisation and the model.
    key: the 32-byte watermark key (never put in the result).
    images: held-out uint8 images [N, H, W, C], never used in training.
    labels: their classes [N].
    n_patterns: n, the number of patterns embedded with this key.
    patch_size: the pattern side (half the image side in the paper).
    num_classes: C.
    m: queries per pattern, drawn without replacement from `images`
      independently of the key's labels; None stamps every image.
    alpha: the false-claim probability allowed; `verified` is p_conditional <=
      alpha.
    rng: draws the queries.
    batch_size: images per predict_fn call.

  Returns:
    A JSON-serialisable dict (see docs/watermark-spec.md, "Report"): the
    key's fingerprint, both tests' statistics and p-values, the decision,
    Acc_W on the queries and per-pattern lists; never the key or the labels.
  """
  images = _check_uint8_images(images)
  patterns, pattern_labels = expand_key(key, n_patterns, patch_size, images.shape[-1], num_classes)
  labels = _check_labels(labels, len(images), num_classes, "labels")
  batch_size = _check_int("batch_size", batch_size, 1)
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  carrier_ids, pattern_ids = verification_queries(len(images), n_patterns, m, rng)
  predictions = _predict_queries(
    predict_fn, images, carrier_ids, patterns, pattern_ids, num_classes, batch_size
  )
  stats = decide(
    predictions,
    pattern_ids,
    labels[carrier_ids],
    pattern_labels,
    num_classes=num_classes,
    alpha=alpha,
  )
  return {"key_fingerprint": key_fingerprint(key), "m": None if m is None else int(m), **stats}
