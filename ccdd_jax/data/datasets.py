"""Data sets as uint8 pixel arrays: the `Dataset` and the dispatch that loads one.

Images stay uint8 NHWC in pixel space; the input transform applied after
triggers are stamped lives in `preprocess` (Preprocessor, fit_preprocessor).
The sources: scikit-learn's digits here, image folders and Tiny ImageNet in
`image_files` (with its decode cache, via `file_cache`), and TensorFlow
Datasets in `tfds_source`. Those loaders return plain dicts of arrays, and
`load_dataset` builds the `Dataset` from them.

The owner's training split D_C excludes `data.attacker_fraction` of it (per
class): the attacker's own clean data for the threat experiments
(`--stage=attacks`), disjoint from everything the owner trains on.
"""

import dataclasses

import ml_collections
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.data import image_files
from ccdd_jax.data import tfds_source


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A labelled image classification data set held in memory."""

  name: str
  train_images: np.ndarray  # uint8 [N, H, W, C]
  train_labels: np.ndarray  # int64 [N]
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple
  # Held out of the training split for the attacker (data.attacker_fraction).
  attacker_images: np.ndarray | None = None
  attacker_labels: np.ndarray | None = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple:
    return tuple(self.train_images.shape[1:])


def stratified_split(
  labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
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
  return Dataset(
    "digits",
    images[train],
    labels[train],
    images[test],
    labels[test],
    tuple(str(i) for i in range(10)),
  )


def hold_out_attacker_data(dataset: Dataset, fraction: float, seed: int) -> Dataset:
  """`dataset` with `fraction` of each training class moved to the attacker's split."""
  if not fraction:
    return dataset
  if not 0.0 < fraction < 1.0:
    raise CCDDError(f"data.attacker_fraction must be in [0, 1), got {fraction}")
  owner, attacker = stratified_split(
    dataset.train_labels, fraction, np.random.default_rng([seed, 1])
  )
  return dataclasses.replace(
    dataset,
    train_images=dataset.train_images[owner],
    train_labels=dataset.train_labels[owner],
    attacker_images=dataset.train_images[attacker],
    attacker_labels=dataset.train_labels[attacker],
  )


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """Loads the data set a config names, with the attacker's split held out of training."""
  fraction = data_config.get("attacker_fraction", 0.0)
  return hold_out_attacker_data(_load(data_config), fraction, data_config.get("split_seed", 0))


def _load(data_config: ml_collections.ConfigDict) -> Dataset:
  """The data set a config names, as its source splits it."""
  get = data_config.get
  name = get("name", "")
  if name == "digits":
    return load_digits(data_config.test_fraction, data_config.split_seed)
  if name in image_files.LAYOUTS:
    return Dataset(
      **image_files.load_image_files(
        name,
        get("root", ""),
        image_size=get("image_size", 0),
        train_subset_per_class=get("train_subset_per_class", 0),
        test_subset_per_class=get("test_subset_per_class", 0),
        cache_dir=get("cache_dir", ""),
      )
    )
  if isinstance(name, str) and name.startswith("tfds:") and len(name) > 5:
    return Dataset(
      **tfds_source.load_tfds(
        name[5:], get("tfds_data_dir", "") or "", image_size=get("image_size", 0)
      )
    )
  raise CCDDError(
    f"unknown data.name {name!r}: available: digits, folder, tinyimagenet, tfds:<name>"
  )
