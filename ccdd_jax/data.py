"""Data sets as uint8 pixel arrays, plus the normalisation applied after stamping.

Images stay uint8 NHWC in pixel space until `normalize`: triggers are stamped
on pixels (watermark.stamp) and only then normalised with the training split's
per-channel mean and std, consistently for train, test, triggers and the
exported distilled set.
"""

import dataclasses

import ml_collections
import numpy as np

from ccdd_jax import CCDDError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled image classification data set held in memory."""
  name: str
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int64 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple
  mean: np.ndarray  # float32 [C], of train_images / 255
  std: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple:
    return tuple(self.train_images.shape[1:])


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std of uint8 images scaled to [0, 1]."""
  scaled = images.astype(np.float64) / 255.0
  mean = scaled.mean(axis=(0, 1, 2))
  std = scaled.std(axis=(0, 1, 2))
  return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 normalised images."""
  return ((images.astype(np.float32) / 255.0) - mean) / std


def denormalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Normalised float images -> float pixels in [0, 1] (clipped), for display."""
  return np.clip(np.asarray(images) * std + mean, 0.0, 1.0)


def stratified_split(labels: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Indices of a per-class stratified train/test split."""
  if not 0.0 < test_fraction < 1.0:
    raise CCDDError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * len(idx)))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(test_fraction: float, split_seed: int) -> Dataset:
  """scikit-learn's bundled 8x8 digits (1,797 real images), split per class."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  # Pixel values are 0..16; map to 0..255 so triggers live in the same range.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  train, test = stratified_split(labels, test_fraction, np.random.default_rng(split_seed))
  mean, std = channel_stats(images[train])
  return Dataset("digits", images[train], labels[train], images[test], labels[test],
                 tuple(str(i) for i in range(10)), mean, std)


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """Loads the data set a config names."""
  if data_config.name == "digits":
    return load_digits(data_config.test_fraction, data_config.split_seed)
  raise CCDDError(f"unknown data.name {data_config.name!r}: available: digits")
