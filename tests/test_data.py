"""datasets.load_dataset beyond image files: TFDS, the loaders' import order, the attacker split.

The image-file loaders are tested in test_image_files.py, preprocessing in test_preprocess.py.
"""

import subprocess
import sys

from conftest import config_section
import numpy as np
import pytest
from test_image_files import PLAIN_KEYS
from test_image_files import _raises

from ccdd_jax import CCDDError
from ccdd_jax.data import datasets
from ccdd_jax.data import preprocess
from ccdd_jax.data import tfds_source


def test_loaders_do_not_import_data():
  """image_files, tfds_source and preprocess sit below datasets: no import cycle."""
  code = (
    "import sys; import ccdd_jax.data.image_files, ccdd_jax.data.tfds_source, "
    "ccdd_jax.data.preprocess, ccdd_jax.data.file_cache; "
    "assert 'ccdd_jax.data.datasets' not in sys.modules, 'datasets imported'; "
    "assert 'tensorflow' not in sys.modules, 'tensorflow imported eagerly'"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def _tfds_config(name, data_dir="", **kwargs):
  return config_section(
    "data", attacker_fraction=0.0, name=f"tfds:{name}", tfds_data_dir=str(data_dir), **kwargs
  )


def _tfds_with_tensorflow():
  """tensorflow_datasets; skips when it or TensorFlow (reading its files) is absent."""
  pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  tfds.disable_progress_bar()
  return tfds


def test_tfds_not_installed(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
  _raises(_tfds_config("cifar10"), "tensorflow-datasets is not installed")


def test_tfds_data_dir_missing(tmp_path):
  missing = tmp_path / "nowhere"
  _raises(_tfds_config("cifar10", missing), "cifar10", missing)


def test_tfds_not_prepared_never_downloads(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")

  def _no_download(*args, **kwargs):
    raise AssertionError("tried to download")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", _no_download)
  _raises(_tfds_config("cifar10", tmp_path), "'cifar10'", "not prepared", tmp_path)
  assert not list(tmp_path.iterdir())


def test_tfds_unknown_name(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  _raises(
    _tfds_config("no_such_dataset_xyz", tmp_path), "unknown tfds data set", "no_such_dataset_xyz"
  )


def test_tfds_mock_data(tmp_path):
  tfds = _tfds_with_tensorflow()
  with tfds.testing.mock_data(num_examples=6):
    ds = datasets.load_dataset(_tfds_config("cifar10", tmp_path))
    small = datasets.load_dataset(_tfds_config("mnist", tmp_path, image_size=10))
    loaded = tfds_source.load_tfds("cifar10", str(tmp_path))
  assert type(loaded) is dict and set(loaded) == PLAIN_KEYS
  assert loaded["name"] == "tfds:cifar10" and loaded["class_names"] == ds.class_names
  np.testing.assert_array_equal(loaded["train_images"], ds.train_images)
  assert ds.name == "tfds:cifar10" and ds.num_classes == 10
  assert ds.train_images.dtype == np.uint8 and ds.train_images.shape == (6, 32, 32, 3)
  assert ds.test_images.shape == (6, 32, 32, 3)
  assert ds.train_labels.dtype == np.int64 and ds.train_labels.shape == (6,)
  assert preprocess.channel_stats(ds.train_images)[0].shape == (3,)
  assert small.train_images.shape == (6, 10, 10, 1) and small.num_classes == 10


@pytest.fixture(name="tfds_prepared", scope="module")
def fixture_tfds_prepared(tmp_path_factory):
  """A really prepared tfds data dir (no mock) of 8x8 images, one of them 9 wide."""
  tfds = _tfds_with_tensorflow()

  class CcddTinyShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Three classes of random images; found by name only in its data dir."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        supervised_keys=("image", "label"),
        features=tfds.features.FeaturesDict(
          {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["ant", "bee", "cow"]),
          }
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples(9, 0), "test": self._generate_examples(6, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        width = 9 if (seed, i) == (0, 4) else 8
        yield i, {"image": rng.integers(0, 256, (8, width, 3), dtype=np.uint8), "label": i % 3}

  data_dir = tmp_path_factory.mktemp("tfds")
  CcddTinyShapes(data_dir=str(data_dir)).download_and_prepare()
  return data_dir


def test_tfds_prepared_offline(tfds_prepared, tmp_path):
  ds = datasets.load_dataset(_tfds_config("ccdd_tiny_shapes", tfds_prepared, image_size=4))
  assert ds.class_names == ("ant", "bee", "cow")
  assert ds.train_images.shape == (9, 4, 4, 3) and ds.test_images.shape == (6, 4, 4, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [3, 3, 3])
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [2, 2, 2])
  # The one 8x9 training image: an error naming the data set unless resized.
  _raises(
    _tfds_config("ccdd_tiny_shapes", tfds_prepared),
    "ccdd_tiny_shapes",
    "(8, 9, 3)",
    "data.image_size",
  )
  # Prepared in one data dir is not prepared in another.
  _raises(_tfds_config("ccdd_tiny_shapes", tmp_path), "ccdd_tiny_shapes")


def test_attacker_split_is_held_out_of_training_per_class():
  full = datasets.load_dataset(config_section("data", name="digits", attacker_fraction=0.0))
  ds = datasets.load_dataset(config_section("data", name="digits", attacker_fraction=0.2))
  assert ds.attacker_images.dtype == np.uint8 and ds.attacker_images.shape[1:] == (8, 8, 1)
  assert len(ds.train_labels) + len(ds.attacker_labels) == len(full.train_labels)
  np.testing.assert_array_equal(ds.test_images, full.test_images)
  for c in range(10):
    n = np.sum(full.train_labels == c)
    assert np.sum(ds.attacker_labels == c) == round(0.2 * n)
  # Disjoint: no training image of the owner is in the attacker's split.
  owner = {x.tobytes() + bytes([y]) for x, y in zip(ds.train_images, ds.train_labels)}
  held = [x.tobytes() + bytes([y]) for x, y in zip(ds.attacker_images, ds.attacker_labels)]
  assert sum(h in owner for h in held) <= 3  # Digits has a few exact duplicate images.
  assert full.attacker_images is None
  with pytest.raises(CCDDError, match="data.attacker_fraction"):
    datasets.load_dataset(config_section("data", name="digits", attacker_fraction=1.5))
