"""Data sets as uint8 pixel arrays, plus the normalisation applied after stamping.

Images stay uint8 NHWC in pixel space until `normalize`: triggers are stamped
on pixels (watermark.stamp) and only then normalised with the training split's
per-channel mean and std, consistently for train, test, triggers and the
exported distilled set.
"""

import dataclasses
import hashlib
import io
import json
import os
import tarfile

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


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CACHE_VERSION = 1


def _is_image(name: str) -> bool:
  """Whether a file name is a (non-hidden) jpg/jpeg/png image."""
  base = name.rsplit("/", 1)[-1]
  return not base.startswith(".") and base.lower().endswith(_IMAGE_SUFFIXES)


class _FileTree:
  """Files of a directory or a .tar.gz, by relative POSIX path."""

  def __init__(self, root: str, what: str):
    self.root = os.path.abspath(os.path.expanduser(root))
    self.is_tar = os.path.isfile(self.root)
    if self.is_tar:
      if not tarfile.is_tarfile(self.root):
        raise CCDDError(f"data.root {root!r} is neither a directory nor a tar archive")
      st = os.stat(self.root)
      self.fingerprint = ["tar", self.root, st.st_size, st.st_mtime_ns]
      self._members = None
      names = None
    elif os.path.isdir(self.root):
      names, stamps, dirs = [], [], []
      for dirpath, dirnames, filenames in os.walk(self.root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        dirs += [os.path.relpath(os.path.join(dirpath, d), self.root).replace(os.sep, "/")
                 for d in dirnames]
        for f in filenames:
          if f.startswith("."):
            continue
          full = os.path.join(dirpath, f)
          rel = os.path.relpath(full, self.root).replace(os.sep, "/")
          st = os.stat(full)
          names.append(rel)
          stamps.append((rel, st.st_size, st.st_mtime_ns))
      stamps.sort()
      digest = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()
      self.fingerprint = ["dir", self.root, digest]
    else:
      raise CCDDError(f"{what} root {root!r} does not exist")
    self._names = names
    self._dirs = None if self.is_tar else dirs
    self.what = what
    self._prefix = None

  def _list(self):
    """Lists names once, opening the archive if needed."""
    if self._names is not None and self._prefix is not None:
      return
    if self.is_tar:
      try:
        self._tar = tarfile.open(self.root, "r:*")
        self._members, self._dirs = {}, []
        for m in self._tar.getmembers():
          name = m.name[2:] if m.name.startswith("./") else m.name
          name = name.rstrip("/")
          if any(part.startswith(".") or part == "__MACOSX" for part in name.split("/")):
            continue
          if m.isfile():
            self._members[name] = m
          elif m.isdir():
            self._dirs.append(name)
      except (tarfile.TarError, OSError, EOFError) as e:
        raise CCDDError(f"cannot read archive {self.root}: {e}") from e
      self._names = list(self._members)
    # A single top-level directory (a packed folder) is stripped.
    tops = {n.split("/", 1)[0] for n in self._names}
    self._prefix = ""
    if (len(tops) == 1 and all("/" in n for n in self._names)
        and not tops & {"train", "test", "val"}):
      self._prefix = tops.pop() + "/"

  def close(self) -> None:
    """Closes the archive, if one is open."""
    if getattr(self, "_tar", None) is not None:
      self._tar.close()
      self._tar = None

  def names(self) -> list[str]:
    """Relative paths of all files, with any single top-level folder removed."""
    self._list()
    p = len(self._prefix)
    return [n[p:] for n in self._names]

  def dirs(self) -> list[str]:
    """Relative paths of all directories, with any single top-level folder removed."""
    self._list()
    p = len(self._prefix)
    return [d[p:] for d in self._dirs if d.startswith(self._prefix) and len(d) > p]

  def where(self, name: str) -> str:
    """A readable location of a file, for error messages."""
    if self.is_tar:
      return f"{self.root}:{self._prefix}{name}"
    return os.path.join(self.root, self._prefix, name)

  def read(self, names: list[str]):
    """Yields (name, bytes) for the given files, in an order cheap to read."""
    self._list()
    if not self.is_tar:
      for n in names:
        with open(os.path.join(self.root, self._prefix + n), "rb") as f:
          yield n, f.read()
      return
    members = sorted(((self._members[self._prefix + n], n) for n in names),
                     key=lambda mn: mn[0].offset_data)
    for m, n in members:
      yield n, self._tar.extractfile(m).read()

  def read_text(self, name: str) -> str:
    """The text of one file."""
    return next(iter(self.read([name])))[1].decode("utf-8")


def _decode(data: bytes, where: str, image_size: int) -> np.ndarray:
  """One encoded image -> uint8 [H, W, 3], optionally resized to a square."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as img:
      img = img.convert("RGB")
      if image_size:
        img = img.resize((image_size, image_size), Image.BILINEAR)
      return np.asarray(img, dtype=np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise CCDDError(f"cannot decode image {where}: {e}") from e


def _decode_split(tree: _FileTree, files: list[tuple[str, int]],
                  image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Decodes (name, label) files into uint8 NHWC images and int64 labels."""
  label_of = dict(files)
  index_of = {n: i for i, (n, _) in enumerate(files)}
  images = [None] * len(files)
  first = None
  for name, data in tree.read([n for n, _ in files]):
    img = _decode(data, tree.where(name), image_size)
    if first is None:
      first = (name, img.shape)
    elif img.shape != first[1]:
      raise CCDDError(
          f"image {tree.where(name)} is {img.shape[1]}x{img.shape[0]} but "
          f"{tree.where(first[0])} is {first[1][1]}x{first[1][0]}: all images must "
          "have one size (or set data.image_size)")
    images[index_of[name]] = img
  labels = np.array([label_of[n] for n, _ in files], dtype=np.int64)
  return np.stack(images), labels


def _take(files: list[str], k: int) -> list[str]:
  """The first k files in sorted order (all when k is 0)."""
  files = sorted(files)
  return files[:k] if k > 0 else files


def _folder_splits(tree: _FileTree, train_k: int, test_k: int):
  """Class names and (name, label) lists of an image-folder tree."""
  by_split = {"train": {}, "test": {}}
  for d in tree.dirs():
    parts = d.split("/")
    if len(parts) == 2 and parts[0] in by_split:
      by_split[parts[0]].setdefault(parts[1], [])
  for n in tree.names():
    parts = n.split("/")
    if len(parts) == 3 and parts[0] in by_split:
      files = by_split[parts[0]].setdefault(parts[1], [])
      if _is_image(parts[2]):
        files.append(n)
  for split, classes in by_split.items():
    if not classes:
      raise CCDDError(f"no {split}/<class>/ folders in {tree.where(split)}")
  class_names = tuple(sorted(by_split["train"]))
  if tuple(sorted(by_split["test"])) != class_names:
    raise CCDDError(f"class folders of {tree.where('test')} "
                    f"{sorted(by_split['test'])} differ from train's {list(class_names)}")
  splits = []
  for split, k in (("train", train_k), ("test", test_k)):
    files = []
    for label, c in enumerate(class_names):
      if not by_split[split][c]:
        raise CCDDError(f"class folder {tree.where(split + '/' + c)} has no "
                        "jpg/jpeg/png images")
      files += [(n, label) for n in _take(by_split[split][c], k)]
    splits.append(files)
  return class_names, splits[0], splits[1]


def _tinyimagenet_splits(tree: _FileTree, train_k: int, test_k: int):
  """Class names and (name, label) lists of the official Tiny ImageNet layout."""
  names = set(tree.names())
  for required in ("wnids.txt", "val/val_annotations.txt"):
    if required not in names:
      raise CCDDError(f"Tiny ImageNet file {tree.where(required)} is missing")
  class_names = tuple(sorted(w.strip() for w in tree.read_text("wnids.txt").split()
                             if w.strip()))
  label_of = {w: i for i, w in enumerate(class_names)}
  train = {w: [] for w in class_names}
  for n in names:
    parts = n.split("/")
    if (len(parts) == 4 and parts[0] == "train" and parts[2] == "images"
        and parts[1] in train and _is_image(parts[3])):
      train[parts[1]].append(n)
  test = {w: [] for w in class_names}
  for line in tree.read_text("val/val_annotations.txt").splitlines():
    fields = line.split("\t")
    if len(fields) < 2:
      continue
    fname, wnid = fields[0].strip(), fields[1].strip()
    if wnid not in label_of:
      raise CCDDError(f"{tree.where('val/val_annotations.txt')} names wnid {wnid!r} "
                      "not in wnids.txt")
    path = "val/images/" + fname
    if path not in names:
      raise CCDDError(f"validation image {tree.where(path)} is missing")
    test[wnid].append(path)
  splits = []
  for split, by_class, k, where in (("train", train, train_k, "train/{}/images"),
                                    ("val", test, test_k, "val/images for {}")):
    files = []
    for w in class_names:
      if not by_class[w]:
        raise CCDDError(f"Tiny ImageNet {tree.where(where.format(w))} has no images")
      files += [(n, label_of[w]) for n in _take(by_class[w], k)]
    splits.append(files)
  return class_names, splits[0], splits[1]


def _default_cache_dir() -> str:
  """~/.cache/ccdd_jax, honouring XDG_CACHE_HOME."""
  base = (os.environ.get("XDG_CACHE_HOME")
          or os.path.join(os.path.expanduser("~"), ".cache"))
  return os.path.join(base, "ccdd_jax")


def load_image_files(kind: str, root: str, image_size: int = 0,
                     train_subset_per_class: int = 0, test_subset_per_class: int = 0,
                     cache_dir: str = "") -> Dataset:
  """An image-folder ("folder") or Tiny ImageNet ("tinyimagenet") tree or .tar.gz."""
  if not root:
    raise CCDDError(f"data.root must be set for data.name {kind!r}")
  for field, value in (("image_size", image_size),
                       ("train_subset_per_class", train_subset_per_class),
                       ("test_subset_per_class", test_subset_per_class)):
    if int(value) < 0:
      raise CCDDError(f"data.{field} must be >= 0, got {value}")
  tree = _FileTree(root, kind)
  key = hashlib.sha256(json.dumps(
      [_CACHE_VERSION, kind, tree.fingerprint, int(image_size),
       int(train_subset_per_class), int(test_subset_per_class)]).encode()).hexdigest()
  cache_dir = os.path.expanduser(cache_dir or _default_cache_dir())
  base = os.path.basename(tree.root.rstrip("/")) or "root"
  for suffix in (".tar.gz", ".tgz", ".tar"):
    if base.endswith(suffix):
      base = base[:-len(suffix)]
  cache_file = os.path.join(cache_dir, f"{kind}-{base}-{key[:16]}.npz")
  name = f"{kind}:{base}"
  arrays = _read_cache(cache_file)
  if arrays is None:
    split_fn = _folder_splits if kind == "folder" else _tinyimagenet_splits
    try:
      class_names, train, test = split_fn(tree, int(train_subset_per_class),
                                          int(test_subset_per_class))
      train_x, train_y = _decode_split(tree, train, int(image_size))
      test_x, test_y = _decode_split(tree, test, int(image_size))
    finally:
      tree.close()
    if train_x.shape[1:] != test_x.shape[1:]:
      raise CCDDError(f"train images of {tree.root} are {train_x.shape[1:]} but test "
                      f"images are {test_x.shape[1:]}: set data.image_size")
    arrays = dict(train_images=train_x, train_labels=train_y, test_images=test_x,
                  test_labels=test_y, class_names=np.array(class_names, dtype=str))
    _write_cache(cache_file, arrays)
  mean, std = channel_stats(arrays["train_images"])
  return Dataset(name, arrays["train_images"], arrays["train_labels"],
                 arrays["test_images"], arrays["test_labels"],
                 tuple(str(c) for c in arrays["class_names"]), mean, std)


def _read_cache(path: str):
  """The arrays of a cache file, or None when absent or unreadable."""
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, KeyError):
    return None


def _write_cache(path: str, arrays: dict) -> None:
  """Writes a cache file atomically; an unwritable cache dir is not an error."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except OSError:
    pass


def load_tfds(name: str, data_dir: str = "") -> Dataset:
  """A prepared TensorFlow Datasets data set (train and test splits), offline."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CCDDError(
        "tensorflow-datasets is not installed: pip install -e '.[tfds]'") from e
  where = data_dir or "the default tfds data dir"
  try:
    (train, test), info = tfds.load(
        name, split=["train", "test"], data_dir=data_dir or None, download=False,
        batch_size=-1, as_supervised=True, with_info=True)
    train_x, train_y = tfds.as_numpy(train)
    test_x, test_y = tfds.as_numpy(test)
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CCDDError(f"tfds data set {name!r} is not prepared in {where}: {first}") from e
  train_x, test_x = np.asarray(train_x), np.asarray(test_x)
  if train_x.dtype != np.uint8 or train_x.ndim != 4:
    raise CCDDError(f"tfds data set {name!r} has {train_x.dtype} images of shape "
                    f"{train_x.shape[1:]}: need uint8 NHWC of one size")
  label = info.features["label"] if "label" in info.features else None
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  names = getattr(label, "names", None) or [str(i) for i in range(num_classes)]
  mean, std = channel_stats(train_x)
  return Dataset(f"tfds:{name}", train_x, np.asarray(train_y, np.int64),
                 test_x.astype(np.uint8), np.asarray(test_y, np.int64),
                 tuple(str(n) for n in names), mean, std)


def load_dataset(data_config: ml_collections.ConfigDict) -> Dataset:
  """Loads the data set a config names."""
  get = data_config.get
  name = get("name", "")
  if name == "digits":
    return load_digits(data_config.test_fraction, data_config.split_seed)
  if name in ("folder", "tinyimagenet"):
    return load_image_files(
        name, get("root", ""), image_size=get("image_size", 0),
        train_subset_per_class=get("train_subset_per_class", 0),
        test_subset_per_class=get("test_subset_per_class", 0),
        cache_dir=get("cache_dir", ""))
  if isinstance(name, str) and name.startswith("tfds:") and len(name) > 5:
    return load_tfds(name[5:], os.path.expanduser(get("tfds_data_dir", "") or ""))
  raise CCDDError(f"unknown data.name {name!r}: available: digits, folder, "
                  "tinyimagenet, tfds:<name>")
