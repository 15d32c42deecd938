"""TensorFlow Datasets image classification sets, read offline from a prepared data dir.

Nothing is downloaded: a set must have been prepared (`tfds build`) in
data.tfds_data_dir or the default tfds data dir. TFDS and TensorFlow are
imported only inside `load_tfds`, and TensorFlow's failures are translated
into one-line CCDDErrors that say what to fix. The loader returns plain arrays
in a dict; `data.load_dataset` builds the `Dataset`, so this module does not
import `data`.
"""

import os

import numpy as np

from ccdd_jax import CCDDError


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


def _tfds_split_arrays(
  tfds, split_ds, static_shape: bool, what: str, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
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
      raise CCDDError(
        f"{what} has images of shapes {images[0].shape} and {x.shape}: "
        "all images must have one size (or set data.image_size)"
      )
    images.append(x)
    labels.append(int(y))
  if not images:
    raise CCDDError(f"{what} has no examples")
  return np.stack(images), np.array(labels, dtype=np.int64)


def _check_arguments(name: str, data_dir: str, image_size: int) -> str:
  """Validates image_size and the data dir; returns the data dir, user-expanded."""
  if int(image_size) < 0:
    raise CCDDError(f"data.image_size must be >= 0, got {image_size}")
  data_dir = os.path.expanduser(data_dir or "")
  if data_dir and not os.path.isdir(data_dir):
    raise CCDDError(
      f"data.tfds_data_dir {data_dir!r} (for tfds data set {name!r}) is not a directory"
    )
  return data_dir


def _import_tfds():
  """The tensorflow_datasets module, or a CCDDError that says how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CCDDError("tensorflow-datasets is not installed: pip install -e '.[tfds]'") from e
  return tfds


def _tfds_builder(tfds, name: str, data_dir: str) -> tuple:
  """The tfds builder of `name` and where its data lives (for messages)."""
  where = data_dir or getattr(
    getattr(tfds.core, "constants", None), "DATA_DIR", "the default tfds data dir"
  )
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    if type(e).__name__ == "DatasetNotFoundError":
      raise CCDDError(
        f"unknown tfds data set {name!r}: no tfds builder of that name and none prepared in {where}"
      ) from e
    raise CCDDError(f"tfds data set {name!r}: {_first_line(e)}") from e
  return builder, where


def _not_prepared(builder) -> bool:
  """Whether the builder says for sure that its data set is not prepared."""
  try:
    return not builder.is_prepared()
  except Exception:  # pylint: disable=broad-except
    return False


def _eval_split_and_features(info, name: str, where: str) -> tuple:
  """The evaluation split's name and the image and label features of a set's info."""
  splits = list(info.splits.keys()) if info.splits else []
  eval_split = next((s for s in ("test", "validation") if s in splits), None if splits else "test")
  if splits and ("train" not in splits or eval_split is None):
    raise CCDDError(
      f"tfds data set {name!r} in {where} has splits {sorted(splits)}: "
      "need train and test (or validation)"
    )
  keys = info.supervised_keys
  if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
    raise CCDDError(
      f"tfds data set {name!r} has no (image, label) supervised keys: "
      "not an image classification set"
    )
  return eval_split, info.features[keys[0]], info.features[keys[1]]


def _open_splits(builder, name: str, where: str, eval_split: str) -> tuple:
  """The train and evaluation tf.data sets of (image, label) pairs, files unshuffled."""
  _hide_gpus_from_tensorflow()
  try:
    train_ds, test_ds = builder.as_dataset(
      split=["train", eval_split], as_supervised=True, shuffle_files=False
    )
  except Exception as e:  # pylint: disable=broad-except
    if _not_prepared(builder):
      raise CCDDError(
        f"tfds data set {name!r} is not prepared in {where}: nothing is "
        f"downloaded here (run `tfds build {name} --data_dir DIR` where "
        "there is network and copy DIR over)"
      ) from e
    if isinstance(e, ImportError):
      raise CCDDError(
        "tensorflow is not installed (tfds reads its files with it): pip install -e '.[tfds]'"
      ) from e
    raise CCDDError(f"cannot read tfds data set {name!r} from {where}: {_first_line(e)}") from e
  return train_ds, test_ds


def _read_splits(tfds, splits, image_feature, name: str, where: str, image_size: int) -> list:
  """[train_x, train_y, test_x, test_y] of (split name, tf.data set) pairs, checked."""
  shape = tuple(getattr(image_feature, "shape", ()) or ())
  static = len(shape) == 3 and all(isinstance(d, int) for d in shape)
  arrays = []
  for split, split_ds in splits:
    what = f"tfds data set {name!r} split {split!r}"
    try:
      arrays += _tfds_split_arrays(tfds, split_ds, static, what, int(image_size))
    except CCDDError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise CCDDError(f"cannot read {what} from {where}: {_first_line(e)}") from e
  train_x, _, test_x, _ = arrays
  if train_x.dtype != np.uint8 or train_x.ndim != 4 or test_x.shape[1:] != train_x.shape[1:]:
    raise CCDDError(
      f"tfds data set {name!r} has {train_x.dtype} images of shapes "
      f"{train_x.shape[1:]} and {test_x.shape[1:]}: need uint8 NHWC of "
      "one size (or set data.image_size)"
    )
  return arrays


def load_tfds(name: str, data_dir: str = "", image_size: int = 0) -> dict:
  """A TensorFlow Datasets image classification set prepared offline (never downloads).

  The train split, and test (or else validation) for evaluation. TFDS and
  TensorFlow are imported only when this runs.
  """
  data_dir = _check_arguments(name, data_dir, image_size)
  tfds = _import_tfds()
  builder, where = _tfds_builder(tfds, name, data_dir)
  eval_split, image_feature, label_feature = _eval_split_and_features(builder.info, name, where)
  train_ds, test_ds = _open_splits(builder, name, where, eval_split)
  splits = (("train", train_ds), (eval_split, test_ds))
  train_x, train_y, test_x, test_y = _read_splits(
    tfds, splits, image_feature, name, where, image_size
  )
  num_classes = (
    getattr(label_feature, "num_classes", None) or int(max(train_y.max(), test_y.max())) + 1
  )
  names = getattr(label_feature, "names", None) or [str(i) for i in range(num_classes)]
  return dict(
    name=f"tfds:{name}",
    train_images=train_x,
    train_labels=train_y,
    test_images=test_x,
    test_labels=test_y,
    class_names=tuple(str(n) for n in names),
  )
