"""The image-file loaders: folders and .tar.gz of images, Tiny ImageNet, the CIFAR-10 tarball."""

import os
import pathlib
import tarfile

from conftest import config_section
import numpy as np
from PIL import Image
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.data import datasets
from ccdd_jax.data import image_files
from ccdd_jax.data import preprocess

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


@pytest.mark.slow
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
