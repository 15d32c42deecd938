"""Image files on disk: an image-folder tree or Tiny ImageNet, as a directory or a .tar.gz.

Two layouts are read: "folder" (train/<class>/*.png|jpg and test/<class>/...)
and "tinyimagenet" (the official wnids.txt, train/<wnid>/images/ and
val/images/ with val/val_annotations.txt). A single top-level folder, as in a
packed archive, is stripped. Images are decoded to uint8 RGB, optionally
resized to a square; the decoded arrays are cached (file_cache) under a key of
the files' sizes and mtimes (or the archive's) and the loading options.

The loader returns plain arrays in a dict; `data.load_dataset` builds the
`Dataset` from them, so this module does not import `data`.
"""

import hashlib
import io
import json
import os
import tarfile

import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.data import file_cache

LAYOUTS = ("folder", "tinyimagenet")  # The `kind`s load_image_files reads.
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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
        dirs += [
          os.path.relpath(os.path.join(dirpath, d), self.root).replace(os.sep, "/")
          for d in dirnames
        ]
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
    if (
      len(tops) == 1 and all("/" in n for n in self._names) and not tops & {"train", "test", "val"}
    ):
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
    members = sorted(
      ((self._members[self._prefix + n], n) for n in names), key=lambda mn: mn[0].offset_data
    )
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


def _decode_split(
  tree: _FileTree, files: list[tuple[str, int]], image_size: int
) -> tuple[np.ndarray, np.ndarray]:
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
        "have one size (or set data.image_size)"
      )
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
    raise CCDDError(
      f"class folders of {tree.where('test')} "
      f"{sorted(by_split['test'])} differ from train's {list(class_names)}"
    )
  splits = []
  for split, k in (("train", train_k), ("test", test_k)):
    files = []
    for label, c in enumerate(class_names):
      if not by_split[split][c]:
        raise CCDDError(f"class folder {tree.where(split + '/' + c)} has no jpg/jpeg/png images")
      files += [(n, label) for n in _take(by_split[split][c], k)]
    splits.append(files)
  return class_names, splits[0], splits[1]


def _tinyimagenet_splits(tree: _FileTree, train_k: int, test_k: int):
  """Class names and (name, label) lists of the official Tiny ImageNet layout."""
  names = set(tree.names())
  for required in ("wnids.txt", "val/val_annotations.txt"):
    if required not in names:
      raise CCDDError(f"Tiny ImageNet file {tree.where(required)} is missing")
  class_names = tuple(sorted(w.strip() for w in tree.read_text("wnids.txt").split() if w.strip()))
  label_of = {w: i for i, w in enumerate(class_names)}
  train = {w: [] for w in class_names}
  for n in names:
    parts = n.split("/")
    if (
      len(parts) == 4
      and parts[0] == "train"
      and parts[2] == "images"
      and parts[1] in train
      and _is_image(parts[3])
    ):
      train[parts[1]].append(n)
  test = {w: [] for w in class_names}
  for line in tree.read_text("val/val_annotations.txt").splitlines():
    fields = line.split("\t")
    if len(fields) < 2:
      continue
    fname, wnid = fields[0].strip(), fields[1].strip()
    if wnid not in label_of:
      raise CCDDError(
        f"{tree.where('val/val_annotations.txt')} names wnid {wnid!r} not in wnids.txt"
      )
    path = "val/images/" + fname
    if path not in names:
      raise CCDDError(f"validation image {tree.where(path)} is missing")
    test[wnid].append(path)
  splits = []
  for _, by_class, k, where in (
    ("train", train, train_k, "train/{}/images"),
    ("val", test, test_k, "val/images for {}"),
  ):
    files = []
    for w in class_names:
      if not by_class[w]:
        raise CCDDError(f"Tiny ImageNet {tree.where(where.format(w))} has no images")
      files += [(n, label_of[w]) for n in _take(by_class[w], k)]
    splits.append(files)
  return class_names, splits[0], splits[1]


def load_image_files(
  kind: str,
  root: str,
  image_size: int = 0,
  train_subset_per_class: int = 0,
  test_subset_per_class: int = 0,
  cache_dir: str = "",
) -> dict:
  """An image-folder ("folder") or Tiny ImageNet ("tinyimagenet") tree or .tar.gz."""
  if kind not in LAYOUTS:
    raise ValueError(f"kind must be one of {LAYOUTS}, got {kind!r}")
  if not root:
    raise CCDDError(f"data.root must be set for data.name {kind!r}")
  for field, value in (
    ("image_size", image_size),
    ("train_subset_per_class", train_subset_per_class),
    ("test_subset_per_class", test_subset_per_class),
  ):
    if int(value) < 0:
      raise CCDDError(f"data.{field} must be >= 0, got {value}")
  tree = _FileTree(root, kind)
  key = hashlib.sha256(
    json.dumps(
      [
        file_cache.CACHE_VERSION,
        kind,
        tree.fingerprint,
        int(image_size),
        int(train_subset_per_class),
        int(test_subset_per_class),
      ]
    ).encode()
  ).hexdigest()
  cache_dir = os.path.expanduser(cache_dir or file_cache.default_cache_dir())
  base = os.path.basename(tree.root.rstrip("/")) or "root"
  for suffix in (".tar.gz", ".tgz", ".tar"):
    if base.endswith(suffix):
      base = base[: -len(suffix)]
  cache_file = os.path.join(cache_dir, f"{kind}-{base}-{key[:16]}.npz")
  name = f"{kind}:{base}"
  arrays = file_cache.read_cache(cache_file)
  if arrays is None:
    split_fn = _folder_splits if kind == "folder" else _tinyimagenet_splits
    try:
      class_names, train, test = split_fn(
        tree, int(train_subset_per_class), int(test_subset_per_class)
      )
      train_x, train_y = _decode_split(tree, train, int(image_size))
      test_x, test_y = _decode_split(tree, test, int(image_size))
    finally:
      tree.close()
    if train_x.shape[1:] != test_x.shape[1:]:
      raise CCDDError(
        f"train images of {tree.root} are {train_x.shape[1:]} but test "
        f"images are {test_x.shape[1:]}: set data.image_size"
      )
    arrays = dict(
      train_images=train_x,
      train_labels=train_y,
      test_images=test_x,
      test_labels=test_y,
      class_names=np.array(class_names, dtype=str),
    )
    file_cache.write_cache(cache_file, arrays)
  return dict(
    name=name,
    train_images=arrays["train_images"],
    train_labels=arrays["train_labels"],
    test_images=arrays["test_images"],
    test_labels=arrays["test_labels"],
    class_names=tuple(str(c) for c in arrays["class_names"]),
  )
