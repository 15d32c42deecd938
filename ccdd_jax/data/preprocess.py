"""The input transform: uint8 pixels <-> network inputs, fitted on the training split.

Pixel space comes first. Data sets stay uint8 NHWC in pixel space until a
`Preprocessor` maps them to network inputs: triggers are stamped on pixels
(watermark.stamp) and only then transformed, consistently for train, test,
triggers and the exported distilled set. The transform is fitted on the
training split: its per-channel mean and std, or (MTT's option) ZCA whitening
of the [0, 1] pixels.
"""

from collections.abc import Mapping
import dataclasses
import hashlib
import json
import os

from typing import Any

import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.data import file_cache


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 images scaled to [0, 1]."""
  scaled = images.astype(np.float64) / 255.0
  mean = scaled.mean(axis=(0, 1, 2))
  std = scaled.std(axis=(0, 1, 2))
  return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 normalised images."""
  return ((images.astype(np.float32) / 255.0) - mean) / std


_CHUNK = 4096  # Rows per float chunk: bounds temporaries for 50,000+ images.


def _fit_zca(images: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean, whitening and inverse matrices of kornia's ZCAWhitening, in float64."""
  n = images.shape[0]
  flat = images.reshape(n, -1)
  total = np.zeros(flat.shape[1])
  for start in range(0, n, _CHUNK):
    total += flat[start : start + _CHUNK].sum(axis=0, dtype=np.float64)
  mean = total / (255.0 * n)
  cov = np.zeros((flat.shape[1],) * 2)
  for start in range(0, n, _CHUNK):
    centred = flat[start : start + _CHUNK].astype(np.float64) / 255.0 - mean
    cov += centred.T @ centred
  cov /= n - 1  # kornia's unbiased covariance.
  # kornia takes svd(cov); for a symmetric PSD matrix the eigendecomposition is
  # the same factorisation and eigh is several times faster (D = 12,288 for
  # Tiny ImageNet). Round-off can leave tiny negative eigenvalues: clip them.
  s, u = np.linalg.eigh(cov)
  del cov
  s = np.maximum(s, 0.0)
  transform = (u / np.sqrt(s + eps)) @ u.T
  inverse = (u * np.sqrt(s + eps)) @ u.T
  return mean.astype(np.float32), transform.astype(np.float32), inverse.astype(np.float32)


def _flatten_for(images: np.ndarray, dim: int) -> np.ndarray:
  """[..., H, W, C] -> [N, dim], checking that H * W * C matches the ZCA fit."""
  if images.ndim < 3 or int(np.prod(images.shape[-3:])) != dim:
    raise CCDDError(
      f"images of shape {images.shape} do not match the ZCA transform, "
      f"fitted on images of {dim} values"
    )
  return images.reshape(-1, dim)


def _chunked_affine(
  flat: np.ndarray, scale: float, shift: np.ndarray, matrix: np.ndarray, offset: np.ndarray
) -> np.ndarray:
  """(flat * scale - shift) @ matrix + offset in float32, a chunk of rows at a time."""
  out = np.empty(flat.shape, np.float32)
  for start in range(0, len(flat), _CHUNK):
    chunk = flat[start : start + _CHUNK].astype(np.float32) * np.float32(scale) - shift
    out[start : start + _CHUNK] = chunk @ matrix + offset
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessor:
  """uint8 pixels <-> network inputs: per-channel standardisation, or ZCA whitening.

  With ZCA (kornia's ZCAWhitening as MTT uses it) there is no mean/std
  normalisation: inputs are (x / 255 - zca_mean) @ zca_transform over the
  flattened HWC image. kornia flattens CHW; the whitened images are the same,
  as ZCA commutes with any fixed reordering of the coordinates.
  """

  mean: np.ndarray  # float32 [C], of the training pixels / 255
  std: np.ndarray  # float32 [C]
  zca_mean: np.ndarray | None = None  # float32 [D], D = H * W * C
  zca_transform: np.ndarray | None = None  # float32 [D, D]: U diag((S + eps)^-1/2) U^T
  zca_inverse: np.ndarray | None = None  # float32 [D, D]: U diag((S + eps)^1/2) U^T
  zca_eps: float = 0.0

  @property
  def zca(self) -> bool:
    """Whether this is ZCA whitening (else per-channel mean/std)."""
    return self.zca_transform is not None

  def pixels_to_inputs(self, pixels: Any, xp: Any = np) -> Any:
    """[0, 1] pixels [N, H, W, C] -> network inputs, in numpy or, with xp=jax.numpy, traceable
    (Neural Cleanse optimises pixels through it)."""
    if not self.zca:
      return (pixels - xp.asarray(self.mean)) / xp.asarray(self.std)
    flat = pixels.reshape(pixels.shape[0], -1)
    whitened = (flat - xp.asarray(self.zca_mean)) @ xp.asarray(self.zca_transform)
    return whitened.reshape(pixels.shape)

  def apply(self, images: np.ndarray) -> np.ndarray:
    """Pixels on the 0..255 scale (uint8 [..., H, W, C]) -> float32 network inputs."""
    images = np.asarray(images)
    if not self.zca:
      return self.pixels_to_inputs(images.astype(np.float32) / 255.0)
    # ZCA a chunk of rows at a time: the same transform, with bounded temporaries.
    flat = _flatten_for(images, self.zca_mean.shape[0])
    out = _chunked_affine(flat, 1.0 / 255.0, self.zca_mean, self.zca_transform, 0.0)
    return out.reshape(images.shape)

  def to_pixels(self, images: np.ndarray, clip: bool = True) -> np.ndarray:
    """Network inputs -> float32 pixels in [0, 1] (clipped unless clip=False)."""
    images = np.asarray(images)
    if not self.zca:
      pixels = (images * self.std + self.mean).astype(np.float32)
    else:
      flat = _flatten_for(images, self.zca_mean.shape[0])
      pixels = _chunked_affine(flat, 1.0, 0.0, self.zca_inverse, self.zca_mean).reshape(
        images.shape
      )
    return np.clip(pixels, 0.0, 1.0) if clip else pixels

  def as_arrays(self) -> dict:
    """The fitted transform as named arrays, to save beside a distilled set."""
    arrays = {"preprocess_mean": self.mean, "preprocess_std": self.std}
    if self.zca:
      arrays.update(
        zca_mean=self.zca_mean,
        zca_transform=self.zca_transform,
        zca_inverse=self.zca_inverse,
        zca_eps=np.float64(self.zca_eps),
      )
    return arrays

  @classmethod
  def from_arrays(cls, arrays: Mapping) -> "Preprocessor":
    """The transform `as_arrays` saved (other keys, e.g. images, are ignored)."""
    zca_keys = ("zca_mean", "zca_transform", "zca_inverse", "zca_eps")
    missing = [k for k in ("preprocess_mean", "preprocess_std") if k not in arrays]
    present = [k for k in zca_keys if k in arrays]
    if present:
      missing += [k for k in zca_keys if k not in arrays]
    if missing:
      raise CCDDError(f"saved preprocessing arrays lack {', '.join(missing)}")
    get = lambda k: np.asarray(arrays[k], np.float32)
    if not present:
      return cls(get("preprocess_mean"), get("preprocess_std"))
    return cls(
      get("preprocess_mean"),
      get("preprocess_std"),
      get("zca_mean"),
      get("zca_transform"),
      get("zca_inverse"),
      float(arrays["zca_eps"]),
    )


def fit_preprocessor(
  train_images: np.ndarray, zca: bool = False, zca_eps: float = 0.1, cache_dir: str | None = None
) -> Preprocessor:
  """Fits the input transform on uint8 training images: mean/std, or ZCA (MTT: eps 0.1).

  A ZCA fit is cached in cache_dir ("" for ~/.cache/ccdd_jax), keyed by a hash
  of the images and eps; None (the default) does not cache.
  """
  train_images = np.asarray(train_images)
  mean, std = channel_stats(train_images)
  if not zca:
    return Preprocessor(mean, std)
  if not zca_eps > 0:
    raise CCDDError(f"data.zca_eps must be > 0, got {zca_eps}")
  if train_images.ndim != 4 or train_images.shape[0] < 2:
    raise CCDDError(f"ZCA needs two or more NHWC training images, got shape {train_images.shape}")
  cache_file = None
  if cache_dir is not None:
    digest = hashlib.sha256(
      json.dumps(
        [
          file_cache.CACHE_VERSION,
          "zca",
          list(train_images.shape),
          str(train_images.dtype),
          float(zca_eps),
        ]
      ).encode()
    )
    digest.update(np.ascontiguousarray(train_images).data)
    cache_file = os.path.join(
      os.path.expanduser(cache_dir or file_cache.default_cache_dir()),
      f"zca-{digest.hexdigest()[:16]}.npz",
    )
    arrays = file_cache.read_cache(cache_file)
    if arrays is not None and "zca_transform" in arrays:
      return Preprocessor.from_arrays(arrays)
  fitted = Preprocessor(mean, std, *_fit_zca(train_images, float(zca_eps)), zca_eps=float(zca_eps))
  if cache_file is not None:
    file_cache.write_cache(cache_file, fitted.as_arrays())
  return fitted
