"""Data sets as uint8 pixel arrays, plus the input transform applied after stamping.

Images stay uint8 NHWC in pixel space until a `Preprocessor` maps them to
network inputs: triggers are stamped on pixels (watermark.stamp) and only then
transformed, consistently for train, test, triggers and the exported distilled
set. The transform is fitted on the training split: its per-channel mean and
std, or (MTT's option) ZCA whitening of the [0, 1] pixels.
"""

import dataclasses
import hashlib
import io
import json
import os
import tarfile
from typing import Mapping, Optional

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


_CHUNK = 4096  # Rows per float chunk: bounds temporaries for 50,000+ images.


def _fit_zca(images: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean, whitening and inverse matrices of kornia's ZCAWhitening, in float64."""
  n = images.shape[0]
  flat = images.reshape(n, -1)
  total = np.zeros(flat.shape[1])
  for start in range(0, n, _CHUNK):
    total += flat[start:start + _CHUNK].sum(axis=0, dtype=np.float64)
  mean = total / (255.0 * n)
  cov = np.zeros((flat.shape[1],) * 2)
  for start in range(0, n, _CHUNK):
    centred = flat[start:start + _CHUNK].astype(np.float64) / 255.0 - mean
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
    raise CCDDError(f"images of shape {images.shape} do not match the ZCA transform, "
                    f"fitted on images of {dim} values")
  return images.reshape(-1, dim)


def _chunked_affine(flat: np.ndarray, scale: float, shift: np.ndarray,
                    matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
  """(flat * scale - shift) @ matrix + offset in float32, a chunk of rows at a time."""
  out = np.empty(flat.shape, np.float32)
  for start in range(0, len(flat), _CHUNK):
    chunk = flat[start:start + _CHUNK].astype(np.float32) * np.float32(scale) - shift
    out[start:start + _CHUNK] = chunk @ matrix + offset
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
  zca_mean: Optional[np.ndarray] = None  # float32 [D], D = H * W * C
  zca_transform: Optional[np.ndarray] = None  # float32 [D, D]: U diag((S + eps)^-1/2) U^T
  zca_inverse: Optional[np.ndarray] = None  # float32 [D, D]: U diag((S + eps)^1/2) U^T
  zca_eps: float = 0.0

  @property
  def zca(self) -> bool:
    """Whether this is ZCA whitening (else per-channel mean/std)."""
    return self.zca_transform is not None

  def apply(self, images: np.ndarray) -> np.ndarray:
    """Pixels on the 0..255 scale (uint8 [..., H, W, C]) -> float32 network inputs."""
    images = np.asarray(images)
    if not self.zca:
      return normalize(images, self.mean, self.std)
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
      pixels = _chunked_affine(flat, 1.0, 0.0, self.zca_inverse,
                               self.zca_mean).reshape(images.shape)
    return np.clip(pixels, 0.0, 1.0) if clip else pixels

  def as_arrays(self) -> dict:
    """The fitted transform as named arrays, to save beside a distilled set."""
    arrays = {"preprocess_mean": self.mean, "preprocess_std": self.std}
    if self.zca:
      arrays.update(zca_mean=self.zca_mean, zca_transform=self.zca_transform,
                    zca_inverse=self.zca_inverse, zca_eps=np.float64(self.zca_eps))
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
    return cls(get("preprocess_mean"), get("preprocess_std"), get("zca_mean"),
               get("zca_transform"), get("zca_inverse"), float(arrays["zca_eps"]))


def fit_preprocessor(train_images: np.ndarray, zca: bool = False, zca_eps: float = 0.1,
                     cache_dir: Optional[str] = None) -> Preprocessor:
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
    raise CCDDError(f"ZCA needs two or more NHWC training images, got shape "
                    f"{train_images.shape}")
  cache_file = None
  if cache_dir is not None:
    digest = hashlib.sha256(json.dumps(
        [_CACHE_VERSION, "zca", list(train_images.shape), str(train_images.dtype),
         float(zca_eps)]).encode())
    digest.update(np.ascontiguousarray(train_images).data)
    cache_file = os.path.join(os.path.expanduser(cache_dir or _default_cache_dir()),
                              f"zca-{digest.hexdigest()[:16]}.npz")
    arrays = _read_cache(cache_file)
    if arrays is not None and "zca_transform" in arrays:
      return Preprocessor.from_arrays(arrays)
  fitted = Preprocessor(mean, std, *_fit_zca(train_images, float(zca_eps)),
                        zca_eps=float(zca_eps))
  if cache_file is not None:
    _write_cache(cache_file, fitted.as_arrays())
  return fitted


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


def _first_line(e: BaseException) -> str:
  """The first line of an exception's message, or its type's name."""
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _hide_gpus_from_tensorflow() -> None:
  """Keeps TensorFlow, used only to read tfds files, off the accelerators JAX uses."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], "GPU")
  except (ImportError, RuntimeError, ValueError):
    pass


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, C] (C 1 or 3) -> uint8 [size, size, C], bilinear as for folders."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  out = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)
  return out.reshape(size, size, image.shape[-1])


def _tfds_split_arrays(tfds, split_ds, static_shape: bool, what: str,
                       image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """One tfds split of (image, label) pairs -> uint8 NHWC images, int64 labels."""
  images, labels = [], []
  if static_shape and not image_size:
    for x, y in tfds.as_numpy(split_ds.batch(1024)):
      images.append(np.asarray(x))
      labels.append(np.asarray(y).reshape(-1))
    if not images:
      raise CCDDError(f"{what} has no examples")
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)
  for x, y in tfds.as_numpy(split_ds):
    x = np.asarray(x)
    if x.ndim != 3 or x.dtype != np.uint8:
      raise CCDDError(f"{what} has {x.dtype} images of shape {x.shape}: need uint8 HWC")
    if image_size:
      x = _resize(x, image_size)
    elif images and x.shape != images[0].shape:
      raise CCDDError(f"{what} has images of shapes {images[0].shape} and {x.shape}: "
                      "all images must have one size (or set data.image_size)")
    images.append(x)
    labels.append(int(y))
  if not images:
    raise CCDDError(f"{what} has no examples")
  return np.stack(images), np.array(labels, dtype=np.int64)


def load_tfds(name: str, data_dir: str = "", image_size: int = 0) -> Dataset:
  """A TensorFlow Datasets image classification set prepared offline (never downloads).

  The train split, and test (or else validation) for evaluation. TFDS and
  TensorFlow are imported only here.
  """
  if int(image_size) < 0:
    raise CCDDError(f"data.image_size must be >= 0, got {image_size}")
  data_dir = os.path.expanduser(data_dir or "")
  if data_dir and not os.path.isdir(data_dir):
    raise CCDDError(f"data.tfds_data_dir {data_dir!r} (for tfds data set {name!r}) is "
                    "not a directory")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CCDDError(
        "tensorflow-datasets is not installed: pip install -e '.[tfds]'") from e
  where = data_dir or getattr(getattr(tfds.core, "constants", None), "DATA_DIR",
                              "the default tfds data dir")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == "DatasetNotFoundError":
      raise CCDDError(f"unknown tfds data set {name!r}: no tfds builder of that name "
                      f"and none prepared in {where}") from e
    raise CCDDError(f"tfds data set {name!r}: {_first_line(e)}") from e

  def not_prepared() -> bool:
    try:
      return not builder.is_prepared()
    except Exception:  # pylint: disable=broad-except
      return False

  info = builder.info
  splits = list(info.splits.keys()) if info.splits else []
  eval_split = next((s for s in ("test", "validation") if s in splits),
                    None if splits else "test")
  if splits and ("train" not in splits or eval_split is None):
    raise CCDDError(f"tfds data set {name!r} in {where} has splits {sorted(splits)}: "
                    "need train and test (or validation)")
  keys = info.supervised_keys
  if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
    raise CCDDError(f"tfds data set {name!r} has no (image, label) supervised keys: "
                    "not an image classification set")
  image_feature, label_feature = info.features[keys[0]], info.features[keys[1]]
  _hide_gpus_from_tensorflow()
  try:
    train_ds, test_ds = builder.as_dataset(split=["train", eval_split],
                                           as_supervised=True, shuffle_files=False)
  except Exception as e:  # pylint: disable=broad-except
    if not_prepared():
      raise CCDDError(f"tfds data set {name!r} is not prepared in {where}: nothing is "
                      f"downloaded here (run `tfds build {name} --data_dir DIR` where "
                      "there is network and copy DIR over)") from e
    if isinstance(e, ImportError):
      raise CCDDError("tensorflow is not installed (tfds reads its files with it): "
                      "pip install -e '.[tfds]'") from e
    raise CCDDError(f"cannot read tfds data set {name!r} from {where}: "
                    f"{_first_line(e)}") from e
  shape = tuple(getattr(image_feature, "shape", ()) or ())
  static = len(shape) == 3 and all(isinstance(d, int) for d in shape)
  arrays = []
  for split, split_ds in (("train", train_ds), (eval_split, test_ds)):
    what = f"tfds data set {name!r} split {split!r}"
    try:
      arrays += _tfds_split_arrays(tfds, split_ds, static, what, int(image_size))
    except CCDDError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CCDDError(f"cannot read {what} from {where}: {_first_line(e)}") from e
  train_x, train_y, test_x, test_y = arrays
  if (train_x.dtype != np.uint8 or train_x.ndim != 4
      or test_x.shape[1:] != train_x.shape[1:]):
    raise CCDDError(f"tfds data set {name!r} has {train_x.dtype} images of shapes "
                    f"{train_x.shape[1:]} and {test_x.shape[1:]}: need uint8 NHWC of "
                    "one size (or set data.image_size)")
  num_classes = getattr(label_feature, "num_classes", None) or int(
      max(train_y.max(), test_y.max())) + 1
  names = getattr(label_feature, "names", None) or [str(i) for i in range(num_classes)]
  mean, std = channel_stats(train_x)
  return Dataset(f"tfds:{name}", train_x, train_y, test_x, test_y,
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
    return load_tfds(name[5:], get("tfds_data_dir", "") or "",
                     image_size=get("image_size", 0))
  raise CCDDError(f"unknown data.name {name!r}: available: digits, folder, "
                  "tinyimagenet, tfds:<name>")
