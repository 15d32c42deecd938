"""Tests of the data loaders (image folder, Tiny ImageNet, TFDS) and preprocessing."""

import os
import pathlib
import subprocess
import sys
import tarfile

from conftest import config_section
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.data import datasets
from ccdd_jax.data import image_files
from ccdd_jax.data import preprocess
from ccdd_jax.data import tfds_source

CIFAR_TARBALL = (
  pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
)
CLASSES = ("cat", "dog", "fox")


def _write_image(path: pathlib.Path, value: int, size=(8, 8), mode="RGB"):
  """Writes one solid-colour image (format from the suffix)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  colour = value if mode == "L" else (value, 255 - value, value // 2)
  Image.new(mode, size, colour).save(path)


def _make_folder(root: pathlib.Path, n_train=3, n_test=2, suffix=".png"):
  """An image-folder tree with three classes."""
  for label, c in enumerate(CLASSES):
    for i in range(n_train):
      _write_image(root / "train" / c / f"{i:02d}{suffix}", 40 * label + i)
    for i in range(n_test):
      _write_image(root / "test" / c / f"{i:02d}{suffix}", 40 * label + i)
  return root


def _config(root, cache_dir, **kwargs):
  return config_section(
    "data", attacker_fraction=0.0, name="folder", root=str(root), cache_dir=str(cache_dir), **kwargs
  )


def _cache_files(cache_dir):
  return sorted(pathlib.Path(cache_dir).glob("*.npz"))


def test_folder_loads_png(tmp_path):
  ds = datasets.load_dataset(_config(_make_folder(tmp_path / "imgs"), tmp_path / "cache"))
  assert ds.class_names == CLASSES
  assert ds.train_images.shape == (9, 8, 8, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (6, 8, 8, 3) and ds.test_images.dtype == np.uint8
  np.testing.assert_array_equal(ds.train_labels, np.repeat(np.arange(3), 3))
  np.testing.assert_array_equal(ds.test_labels, np.repeat(np.arange(3), 2))
  assert ds.train_labels.dtype == np.int64
  # PNG is lossless: the first dog image is value 40.
  np.testing.assert_array_equal(ds.train_images[3, 0, 0], [40, 215, 20])
  assert ds.num_classes == 3 and ds.image_shape == (8, 8, 3)
  mean, std = preprocess.channel_stats(ds.train_images)
  assert mean.shape == (3,) and std.shape == (3,)


def test_folder_loads_jpeg_any_case_and_grayscale(tmp_path):
  root = _make_folder(tmp_path / "imgs", suffix=".JPG")
  _write_image(root / "train" / "cat" / "zz.jpeg", 7, mode="L")
  (root / "train" / "cat" / "notes.txt").write_text("not an image")
  ds = datasets.load_dataset(_config(root, tmp_path / "cache"))
  assert ds.train_images.shape == (10, 8, 8, 3)
  assert ds.test_images.shape == (6, 8, 8, 3)
  assert abs(int(ds.train_images[3, 0, 0, 0]) - 7) <= 3


def test_folder_image_size_resizes_mixed_sizes(tmp_path):
  root = _make_folder(tmp_path / "imgs")
  _write_image(root / "train" / "cat" / "big.png", 9, size=(12, 10))
  ds = datasets.load_dataset(_config(root, tmp_path / "cache", image_size=4))
  assert ds.train_images.shape == (10, 4, 4, 3)
  assert ds.test_images.shape == (6, 4, 4, 3)


def test_train_and_test_subset_per_class(tmp_path):
  root = _make_folder(tmp_path / "imgs", n_train=5, n_test=3)
  ds = datasets.load_dataset(
    _config(root, tmp_path / "cache", train_subset_per_class=2, test_subset_per_class=1)
  )
  assert ds.train_images.shape[0] == 6 and ds.test_images.shape[0] == 3
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 1, 1, 2, 2])
  # The first two files in sorted order: values 0 and 1 for "cat".
  np.testing.assert_array_equal(ds.train_images[:2, 0, 0, 0], [0, 1])


def test_tar_gz_with_top_level_folder(tmp_path):
  root = _make_folder(tmp_path / "packed" / "mydata", suffix=".jpg")
  tarball = tmp_path / "mydata.tar.gz"
  with tarfile.open(tarball, "w:gz") as tar:
    tar.add(root, arcname="mydata")
  ds = datasets.load_dataset(_config(tarball, tmp_path / "cache", train_subset_per_class=2))
  assert ds.class_names == CLASSES
  assert ds.train_images.shape == (6, 8, 8, 3)
  assert ds.test_images.shape == (6, 8, 8, 3)
  assert ds.name == "folder:mydata"


def test_tar_gz_without_top_level_folder(tmp_path):
  root = _make_folder(tmp_path / "imgs")
  tarball = tmp_path / "flat.tar.gz"
  with tarfile.open(tarball, "w:gz") as tar:
    tar.add(root / "train", arcname="train")
    tar.add(root / "test", arcname="test")
  ds = datasets.load_dataset(_config(tarball, tmp_path / "cache"))
  assert ds.train_images.shape == (9, 8, 8, 3)


def test_cache_is_written_and_reused(tmp_path, monkeypatch):
  root = _make_folder(tmp_path / "imgs")
  cache = tmp_path / "cache"
  first = datasets.load_dataset(_config(root, cache))
  assert len(_cache_files(cache)) == 1

  def _fail(*args, **kwargs):
    raise AssertionError("decoded again instead of reading the cache")

  monkeypatch.setattr(image_files, "_decode", _fail)
  second = datasets.load_dataset(_config(root, cache))
  np.testing.assert_array_equal(first.train_images, second.train_images)
  np.testing.assert_array_equal(first.test_labels, second.test_labels)
  assert first.class_names == second.class_names
  # Other options or changed files use another cache entry.
  with pytest.raises(AssertionError):
    datasets.load_dataset(_config(root, cache, image_size=4))
  monkeypatch.undo()
  _write_image(root / "train" / "cat" / "99.png", 1)
  assert datasets.load_dataset(_config(root, cache)).train_images.shape[0] == 10


def test_unwritable_cache_dir_still_loads(tmp_path):
  root = _make_folder(tmp_path / "imgs")
  blocker = tmp_path / "file"
  blocker.write_text("x")
  ds = datasets.load_dataset(_config(root, blocker / "cache"))
  assert ds.train_images.shape[0] == 9


PLAIN_KEYS = {"name", "train_images", "train_labels", "test_images", "test_labels", "class_names"}


def test_image_files_returns_plain_arrays(tmp_path):
  root = _make_folder(tmp_path / "imgs")
  loaded = image_files.load_image_files("folder", str(root), cache_dir=str(tmp_path / "c"))
  assert type(loaded) is dict and set(loaded) == PLAIN_KEYS
  assert loaded["name"] == "folder:imgs" and loaded["class_names"] == CLASSES
  assert all(type(c) is str for c in loaded["class_names"])
  ds = datasets.load_dataset(_config(root, tmp_path / "c"))  # From the cache just written.
  for key in PLAIN_KEYS - {"name", "class_names"}:
    np.testing.assert_array_equal(getattr(ds, key), loaded[key])
    assert getattr(ds, key).dtype == loaded[key].dtype
  with pytest.raises(ValueError, match="imagenet"):  # API misuse, not a user error.
    image_files.load_image_files("imagenet", str(root), cache_dir=str(tmp_path / "c"))


def test_loaders_do_not_import_data():
  """image_files, tfds_source and preprocess sit below datasets: no import cycle."""
  code = (
    "import sys; import ccdd_jax.data.image_files, ccdd_jax.data.tfds_source, "
    "ccdd_jax.data.preprocess, ccdd_jax.data.file_cache; "
    "assert 'ccdd_jax.data.datasets' not in sys.modules, 'datasets imported'; "
    "assert 'tensorflow' not in sys.modules, 'tensorflow imported eagerly'"
  )
  subprocess.run([sys.executable, "-c", code], check=True)


def _make_tinyimagenet(root: pathlib.Path):
  wnids = ["n02", "n01"]
  (root / "val" / "images").mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
  lines = []
  for k, w in enumerate(wnids):
    for i in range(3):
      _write_image(
        root / "train" / w / "images" / f"{w}_{i}.JPEG",
        10 * k + i,
        size=(8, 8),
        mode="L" if i == 0 else "RGB",
      )
    (root / "train" / w / f"{w}_boxes.txt").write_text("")
    for i in range(2):
      fname = f"val_{k}{i}.JPEG"
      _write_image(root / "val" / "images" / fname, 10 * k + i)
      lines.append(f"{fname}\t{w}\t0\t0\t7\t7")
  (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
  return root


def test_tinyimagenet(tmp_path):
  root = _make_tinyimagenet(tmp_path / "tiny-imagenet-200")
  cfg = config_section(
    "data", name="tinyimagenet", root=str(root), cache_dir=str(tmp_path / "cache")
  )
  ds = datasets.load_dataset(cfg)
  assert ds.class_names == ("n01", "n02")
  assert ds.train_images.shape == (6, 8, 8, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (4, 8, 8, 3)
  np.testing.assert_array_equal(ds.train_labels, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(ds.test_labels, [0, 0, 1, 1])
  cfg.train_subset_per_class = 1
  assert datasets.load_dataset(cfg).train_images.shape[0] == 2


def test_tinyimagenet_bad_annotation(tmp_path):
  root = _make_tinyimagenet(tmp_path / "tiny")
  with open(root / "val" / "val_annotations.txt", "a") as f:
    f.write("val_x.JPEG\tn99\t0\t0\t1\t1\n")
  cfg = config_section(
    "data", name="tinyimagenet", root=str(root), cache_dir=str(tmp_path / "cache")
  )
  with pytest.raises(CCDDError, match="n99"):
    datasets.load_dataset(cfg)
  os.remove(root / "wnids.txt")
  with pytest.raises(CCDDError, match="wnids.txt"):
    datasets.load_dataset(cfg)


def _tiny_config(root, cache):
  return config_section(
    "data", attacker_fraction=0.0, name="tinyimagenet", root=str(root), cache_dir=str(cache)
  )


def test_tinyimagenet_bad_layouts(tmp_path):
  cache = tmp_path / "cache"
  no_annotations = _make_tinyimagenet(tmp_path / "no_annotations")
  os.remove(no_annotations / "val" / "val_annotations.txt")
  _raises(
    _tiny_config(no_annotations, cache), no_annotations / "val" / "val_annotations.txt", "missing"
  )

  lost_val = _make_tinyimagenet(tmp_path / "lost_val")
  os.remove(lost_val / "val" / "images" / "val_00.JPEG")
  _raises(_tiny_config(lost_val, cache), lost_val / "val" / "images" / "val_00.JPEG")

  no_train = _make_tinyimagenet(tmp_path / "no_train")
  for p in (no_train / "train" / "n01" / "images").iterdir():
    p.unlink()
  _raises(_tiny_config(no_train, cache), no_train / "train" / "n01" / "images")

  mixed = _make_tinyimagenet(tmp_path / "mixed")
  _write_image(mixed / "train" / "n01" / "images" / "n01_9.JPEG", 1, size=(9, 8))
  _raises(_tiny_config(mixed, cache), mixed / "train" / "n01" / "images" / "n01_9.JPEG", "9x8")

  corrupt = _make_tinyimagenet(tmp_path / "corrupt")
  (corrupt / "val" / "images" / "val_10.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
  _raises(_tiny_config(corrupt, cache), corrupt / "val" / "images" / "val_10.JPEG")


def _raises(cfg, *fragments):
  with pytest.raises(CCDDError) as info:
    datasets.load_dataset(cfg)
  msg = str(info.value)
  assert "\n" not in msg
  for fragment in fragments:
    assert str(fragment) in msg
  return msg


def test_bad_inputs(tmp_path):
  cache = tmp_path / "cache"
  missing = tmp_path / "nowhere"
  _raises(_config(missing, cache), missing)

  no_test = tmp_path / "no_test"
  _make_folder(no_test)
  for p in sorted((no_test / "test").rglob("*"), reverse=True):
    p.unlink() if p.is_file() else p.rmdir()
  (no_test / "test").rmdir()
  _raises(_config(no_test, cache), no_test, "test")

  no_train = tmp_path / "no_train"
  _write_image(no_train / "test" / "cat" / "0.png", 1)
  _raises(_config(no_train, cache), no_train, "train")

  empty_class = _make_folder(tmp_path / "empty_class")
  (empty_class / "train" / "emu").mkdir()
  (empty_class / "test" / "emu").mkdir()
  (empty_class / "train" / "emu" / "readme.txt").write_text("no images")
  _raises(_config(empty_class, cache), empty_class / "train" / "emu")

  other_classes = _make_folder(tmp_path / "other_classes")
  _write_image(other_classes / "test" / "owl" / "0.png", 1)
  _raises(_config(other_classes, cache), other_classes, "owl")

  mixed = _make_folder(tmp_path / "mixed")
  _write_image(mixed / "train" / "dog" / "big.png", 1, size=(9, 8))
  _raises(_config(mixed, cache), mixed / "train" / "dog" / "big.png", "9x8", "8x8")

  broken = _make_folder(tmp_path / "broken")
  (broken / "train" / "cat" / "bad.png").write_bytes(b"not a png")
  _raises(_config(broken, cache), broken / "train" / "cat" / "bad.png")

  not_tar = tmp_path / "plain.tar.gz"
  not_tar.write_bytes(b"garbage")
  _raises(_config(not_tar, cache), not_tar)

  _raises(config_section("data", attacker_fraction=0.0, name="folder"), "data.root")
  _raises(config_section("data", attacker_fraction=0.0, name="imagenet"), "imagenet")
  _raises(
    config_section(
      "data", attacker_fraction=0.0, name="tinyimagenet", root=str(missing), cache_dir=str(cache)
    ),
    missing,
  )


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


@pytest.mark.skipif(not CIFAR_TARBALL.is_file(), reason=f"{CIFAR_TARBALL} is absent")
def test_shared_cifar10_tarball(tmp_path):
  ds = datasets.load_dataset(_config(CIFAR_TARBALL, tmp_path / "cache", train_subset_per_class=20))
  assert ds.class_names == (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
  )
  assert ds.train_images.shape == (200, 32, 32, 3) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (10000, 32, 32, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [20] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)


def _toy_images(n=400, side=4, channels=3, seed=0):
  """uint8 images whose pixels are correlated (a few shared factors plus noise)."""
  rng = np.random.default_rng(seed)
  d = side * side * channels
  factors = rng.normal(size=(n, 5)) @ rng.normal(size=(5, d))
  pixels = 128 + 20 * factors + 15 * rng.normal(size=(n, d))
  pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
  return pixels.reshape(n, side, side, channels)


def _kornia_zca(train_u8, eps):
  """kornia ZCAWhitening written out from its formulas, with svd as kornia does."""
  x = train_u8.reshape(len(train_u8), -1).astype(np.float64) / 255.0
  mean = x.mean(axis=0)
  cov = (x - mean).T @ (x - mean) / (len(x) - 1)
  u, s, _ = np.linalg.svd(cov)
  transform = u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T
  inverse = u @ np.diag(np.sqrt(s + eps)) @ u.T
  whiten = lambda u8: ((u8.reshape(len(u8), -1) / 255.0 - mean) @ transform).reshape(u8.shape)
  unwhiten = lambda z: (z.reshape(len(z), -1) @ inverse + mean).reshape(z.shape)
  return whiten, unwhiten, cov, u, s


def test_zca_whitens_to_identity_covariance_as_eps_vanishes():
  x = _toy_images()
  pre = preprocess.fit_preprocessor(x, zca=True, zca_eps=1e-9)
  z = pre.apply(x)
  assert z.dtype == np.float32 and z.shape == x.shape
  flat = z.reshape(len(z), -1).astype(np.float64)
  np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.cov(flat, rowvar=False), np.eye(flat.shape[1]), atol=2e-3)


def test_zca_eps_shrinks_each_eigenvalue_to_s_over_s_plus_eps():
  x = _toy_images(seed=1)
  eps = 0.1
  _, _, _, u, s = _kornia_zca(x, eps)
  z = preprocess.fit_preprocessor(x, zca=True, zca_eps=eps).apply(x)
  cov = np.cov(z.reshape(len(z), -1).astype(np.float64), rowvar=False)
  np.testing.assert_allclose(u.T @ cov @ u, np.diag(s / (s + eps)), atol=1e-4)


def test_zca_matches_kornia_formulas_on_random_data():
  rng = np.random.default_rng(2)
  train = rng.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
  other = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
  whiten, unwhiten, _, _, _ = _kornia_zca(train, 0.1)
  pre = preprocess.fit_preprocessor(train, zca=True)  # MTT's eps, 0.1, is the default.
  assert pre.zca and pre.zca_eps == 0.1
  np.testing.assert_allclose(pre.apply(other), whiten(other), atol=1e-4)
  z = np.random.default_rng(3).normal(size=(5, 4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(pre.to_pixels(z, clip=False), unwhiten(z), atol=1e-5)
  np.testing.assert_allclose(pre.to_pixels(z), np.clip(unwhiten(z), 0, 1), atol=1e-5)


def test_zca_round_trips_to_pixels():
  x = _toy_images(seed=4)
  pre = preprocess.fit_preprocessor(x, zca=True, zca_eps=0.1)
  back = pre.to_pixels(pre.apply(x), clip=False)
  assert back.dtype == np.float32
  np.testing.assert_allclose(back, x / 255.0, atol=1e-5)
  # A single image [H, W, C] works too, and more rows than one chunk.
  np.testing.assert_allclose(pre.apply(x[0]), pre.apply(x[:1])[0], atol=1e-6)
  many = np.concatenate([x] * 11)  # 4,400 rows > preprocess._CHUNK
  out = pre.apply(many)
  # OpenBLAS rounding can depend on the row count of a matmul, so bitwise
  # equality holds chunk for chunk, and across row counts to float32 round-off.
  chunk = preprocess._CHUNK
  np.testing.assert_array_equal(
    out, np.concatenate([pre.apply(many[s : s + chunk]) for s in range(0, len(many), chunk)])
  )
  np.testing.assert_allclose(out[-len(x) :], pre.apply(x), rtol=0, atol=1e-6)


def test_preprocessor_without_zca_is_normalize():
  x = _toy_images(n=50, channels=1, seed=5)
  pre = preprocess.fit_preprocessor(x, zca=False)
  assert not pre.zca
  mean, std = preprocess.channel_stats(x)
  np.testing.assert_array_equal(pre.apply(x), preprocess.normalize(x, mean, std))
  z = pre.apply(x)
  np.testing.assert_allclose(pre.to_pixels(z), np.clip(z * std + mean, 0.0, 1.0), atol=1e-7)
  np.testing.assert_allclose(pre.to_pixels(z, clip=False), x / 255.0, atol=1e-6)


@pytest.mark.parametrize("zca", [False, True])
def test_the_traceable_transform_of_pixels_is_apply(zca):
  """Neural Cleanse's pixels -> inputs (jnp, under jit) is the transform `apply` uses."""
  x = _toy_images(n=40, seed=7)
  pre = preprocess.fit_preprocessor(x, zca=zca, zca_eps=0.2)
  traced = jax.jit(lambda p: pre.pixels_to_inputs(p, xp=jnp))(x.astype(np.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(traced), pre.apply(x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(pre.apply(x), x / 255.0, atol=1e-3)  # It transforms something.


@pytest.mark.parametrize("zca", [False, True])
def test_preprocessor_arrays_round_trip_through_npz(tmp_path, zca):
  x = _toy_images(n=60, seed=6)
  pre = preprocess.fit_preprocessor(x, zca=zca, zca_eps=0.2)
  path = tmp_path / "distilled.npz"
  np.savez(path, images=pre.apply(x[:3]), labels=np.arange(3), **pre.as_arrays())
  with np.load(path, allow_pickle=False) as f:
    loaded = preprocess.Preprocessor.from_arrays(f)
  assert loaded.zca == zca and loaded.zca_eps == pre.zca_eps
  np.testing.assert_array_equal(loaded.apply(x), pre.apply(x))
  z = pre.apply(x)
  np.testing.assert_array_equal(loaded.to_pixels(z), pre.to_pixels(z))


def test_preprocessor_bad_inputs():
  x = _toy_images(n=40)
  for eps in (0.0, -1.0):
    with pytest.raises(CCDDError, match="zca_eps"):
      preprocess.fit_preprocessor(x, zca=True, zca_eps=eps)
  pre = preprocess.fit_preprocessor(x, zca=True)
  with pytest.raises(CCDDError, match="48 values") as info:
    pre.apply(np.zeros((2, 5, 5, 3), np.uint8))
  assert "\n" not in str(info.value)
  arrays = pre.as_arrays()
  del arrays["zca_inverse"]
  with pytest.raises(CCDDError, match="zca_inverse"):
    preprocess.Preprocessor.from_arrays(arrays)
  with pytest.raises(CCDDError, match="preprocess_mean"):
    preprocess.Preprocessor.from_arrays({"images": x})


def test_zca_fit_cache(tmp_path, monkeypatch):
  x = _toy_images(n=80, seed=7)
  first = preprocess.fit_preprocessor(x, zca=True, cache_dir=str(tmp_path))
  assert len(list(tmp_path.glob("zca-*.npz"))) == 1

  def _fail(*args, **kwargs):
    raise AssertionError("fitted again instead of reading the cache")

  monkeypatch.setattr(preprocess, "_fit_zca", _fail)
  second = preprocess.fit_preprocessor(x, zca=True, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(second.zca_transform, first.zca_transform)
  np.testing.assert_array_equal(second.apply(x), first.apply(x))
  # Another eps or other images are another entry; no cache_dir, no cache.
  for kwargs in (dict(zca_eps=0.2), dict(cache_dir=None)):
    with pytest.raises(AssertionError):
      preprocess.fit_preprocessor(x, zca=True, **{"cache_dir": str(tmp_path), **kwargs})
  with pytest.raises(AssertionError):
    preprocess.fit_preprocessor(x[1:], zca=True, cache_dir=str(tmp_path))


def test_zca_cache_name_is_stable(tmp_path):
  """The cache key (CACHE_VERSION, shape, dtype, eps, pixels) is pinned: old entries stay valid."""
  x = (np.arange(40 * 48) * 7 % 256).astype(np.uint8).reshape(40, 4, 4, 3)
  preprocess.fit_preprocessor(x, zca=True, cache_dir=str(tmp_path))
  assert [p.name for p in tmp_path.iterdir()] == ["zca-767527bce792b17c.npz"]


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
