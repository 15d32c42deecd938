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


def check_int(name: str, value, minimum: int) -> int:
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
  n_patterns = check_int("n_patterns", n_patterns, 1)
  patch_size = check_int("patch_size", patch_size, 1)
  channels = check_int("channels", channels, 1)
  num_classes = check_int("num_classes", num_classes, 2)
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


def check_uint8_images(images, name: str = "images") -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"{name} must have shape [N, H, W, C], got {images.shape}")
  if images.dtype != np.uint8:
    raise TypeError(f"{name} must be uint8 pixels (stamp before normalising), got {images.dtype}")
  return images


def check_labels(labels, size: int, num_classes: int, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.shape != (size,) or (size and labels.dtype.kind not in "iu"):
    raise ValueError(f"{name} must be {size} integers, got {labels.dtype} {labels.shape}")
  labels = labels.astype(np.int64)
  if size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"{name} must lie in [0, {num_classes})")
  return labels


def stamp(images: np.ndarray, patterns: np.ndarray, pattern_ids: np.ndarray) -> np.ndarray:
  """Returns `images` with patterns[pattern_ids[j]] over image j's top left."""
  images = check_uint8_images(images)
  patterns = check_uint8_images(patterns, "patterns")
  n_patterns, p, p_w, channels = patterns.shape
  if p != p_w:
    raise ValueError(f"patterns must be square, got {p}x{p_w}")
  if p > images.shape[1] or p > images.shape[2]:
    raise ValueError(f"a {p}x{p} patch does not fit {images.shape[1]}x{images.shape[2]} images")
  if channels != images.shape[3]:
    raise ValueError(f"patterns have {channels} channels but images have {images.shape[3]}")
  pattern_ids = check_labels(pattern_ids, len(images), n_patterns, "pattern_ids")
  stamped = images.copy()
  stamped[:, :p, :p, :] = patterns[pattern_ids]
  return stamped


def corner_mask(image_shape: tuple, patch: int) -> np.ndarray:
  """float32 [1, H, W, 1]: 1 on the top-left patch x patch corner, where `stamp` puts triggers."""
  mask = np.zeros((1, image_shape[0], image_shape[1], 1), np.float32)
  mask[:, :patch, :patch, :] = 1.0
  return mask


def _check_pattern_set(images, labels, patterns, pattern_labels):
  images = check_uint8_images(images)
  patterns = check_uint8_images(patterns, "patterns")
  if not len(patterns):
    raise ValueError("at least one pattern is needed")
  labels = check_labels(labels, len(images), np.iinfo(np.int64).max, "labels")
  pattern_labels = check_labels(
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
    m = check_int("m", m, 1)
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


def trigger_visibility(pixels: np.ndarray, patterns: np.ndarray) -> np.ndarray:
  """How much each image's top-left corner looks like a trigger: max over patterns of
  the cosine similarity of the mean-centred corner and pattern (1 = a stamped copy).

  `pixels` are images in [0, 1] or uint8 [N, H, W, C]; returns float [N].
  """
  patterns = check_uint8_images(patterns, "patterns").astype(np.float64)
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


# ----------------------------------------------------------------------------
# Verification (Stage III).
# ----------------------------------------------------------------------------
