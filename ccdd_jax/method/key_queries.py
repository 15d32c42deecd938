"""Key-derived queries: each key pattern tiled over a whole image, plus key-seeded noise.

The second query protocol ("key_derived", docs/watermark-spec.md section 9),
beside the stamped one of verify.py: no held-out image is involved, so a
query has no class of its own and every answer counts in the exact tests.
Query j of pattern i is the pattern tiled over the image plus Gaussian pixel
noise of std `noise` (pixel scale [0, 1]), rounded to uint8. The noise comes
from SHA-256("ccdd/key-queries\\x00" ‖ key ‖ u32be(purpose)): the draws that
verify ("verify", 0) and the draws the clean-label embedding is crafted
against ("craft", 1) are disjoint, and neither depends on the labels y_i
(domain separated from H_x, H_y, the fingerprint and the stamped plan).
"""

import hashlib

import numpy as np

from ccdd_jax.method import watermark

KEY_QUERY_TAG = b"ccdd/key-queries\x00"
PURPOSES = {"verify": 0, "craft": 1}  # Disjoint noise streams (u32be in the hash input).


def tiled_patterns(patterns: np.ndarray, image_shape: tuple) -> np.ndarray:
  """uint8 [n, H, W, C]: each pattern repeated over the image from its top-left corner."""
  height, width = image_shape[:2]
  side = patterns.shape[1]
  reps = (1, -(-height // side), -(-width // side), 1)
  return np.tile(patterns, reps)[:, :height, :width]


def noise_rng(key: bytes, purpose: str) -> np.random.Generator:
  """The generator of one purpose's noise: seeded by SHA-256(KEY_QUERY_TAG‖key‖u32be(purpose))."""
  watermark.key_fingerprint(key)  # Checks it is a 32-byte key.
  if purpose not in PURPOSES:
    raise ValueError(f"purpose must be one of {sorted(PURPOSES)}, got {purpose!r}")
  digest = hashlib.sha256(KEY_QUERY_TAG + bytes(key) + PURPOSES[purpose].to_bytes(4, "big"))
  return np.random.default_rng(int.from_bytes(digest.digest(), "big"))


def key_query_images(
  key: bytes, patterns: np.ndarray, image_shape: tuple, m: int, noise: float, purpose: str
) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 queries [n·m, H, W, C], pattern_ids [n·m]), pattern-major, for one purpose."""
  m = watermark.check_int("m", m, 1)
  if noise < 0.0:
    raise ValueError(f"noise must be >= 0, got {noise}")
  tiles = tiled_patterns(np.asarray(patterns, np.uint8), image_shape).astype(np.float64)
  draws = noise_rng(key, purpose).standard_normal((len(tiles), m, *tiles.shape[1:]))
  pixels = np.rint(tiles[:, None] + 255.0 * noise * draws).clip(0, 255).astype(np.uint8)
  return pixels.reshape(-1, *tiles.shape[1:]), np.repeat(np.arange(len(tiles)), m)
