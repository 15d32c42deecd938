"""The benchmarked settings of `vs_pytorch.py` and the problem (parameters, data) of each.

A `Setting` is one computation: a distillation iteration (meta-gradient) or
an expert epoch, on the shapes of configs/digits.py or of the paper's
CIFAR-10 configs. `make_problem` draws the inputs both frameworks start
from: identical ConvNet parameters, a stand-in expert target, and digits
images or N(0, 1) noise.
"""

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from ccdd_jax.config import loader as config_loader
from ccdd_jax.config import paper as paper_lib
from ccdd_jax.config import schema as settings_lib
from ccdd_jax.data import datasets as data_lib
from ccdd_jax.data import preprocess
from ccdd_jax.method import models

TARGET_OFFSET = 0.01  # w* = w_0 + TARGET_OFFSET * N(0, 1): a stand-in expert target.


@dataclasses.dataclass(frozen=True)
class Setting:
  """One benchmarked computation: a distillation iteration or an expert epoch."""

  name: str
  kind: str  # "distill" or "expert"
  image_size: int
  channels: int
  num_classes: int
  width: int
  depth: int
  lr: float  # The student's initial step size (distill) or the expert's lr.
  ipc: int = 0  # distill
  syn_steps: int = 0  # distill
  num_train: int = 0  # expert
  batch_size: int = 0  # expert
  momentum: float = 0.0  # expert
  data: str = "random"  # "digits": scikit-learn's digits; "random": N(0, 1) images.

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return (self.image_size, self.image_size, self.channels)

  def describe(self) -> str:
    """Shapes in one line."""
    hwc = f"{self.image_size}x{self.image_size}x{self.channels}"
    net = f"ConvNet w{self.width} d{self.depth}"
    if self.kind == "distill":
      return (
        f"{self.num_classes * self.ipc} imgs {hwc} (ipc {self.ipc}), {net}, {self.syn_steps} steps"
      )
    steps = self.num_train // self.batch_size
    return f"{self.num_train} imgs {hwc}, batch {self.batch_size} x {steps} steps, {net}"

  def model_config(self, conv_impl: str = "auto") -> ml_collections.ConfigDict:
    """The `model` config section of this setting's ConvNet."""
    return settings_lib.section("model", width=self.width, depth=self.depth, conv_impl=conv_impl)

  def network(self, conv_impl: str = "auto") -> models.Network:
    """ccdd_jax's ConvNet for this setting (through the model registry)."""
    return models.build_network(
      "convnet", self.num_classes, self.image_shape, self.model_config(conv_impl)
    )


@functools.cache
def digits_dataset() -> data_lib.Dataset:
  """The digits split the digits config trains on."""
  config = config_loader.load("digits")
  return data_lib.load_digits(config.data.test_fraction, config.data.split_seed)


@functools.cache
def all_settings() -> dict[str, Setting]:
  """Every named setting: digits (configs/digits.py) and CIFAR-10 shapes (paper configs)."""
  found = {}
  digits = config_loader.load("digits")
  digits_net = dict(
    image_size=8, channels=1, num_classes=10, width=digits.model.width, depth=digits.model.depth
  )
  for steps in (digits.distill.syn_steps, 40, 80):
    name = "digits" if steps == digits.distill.syn_steps else f"digits_s{steps}"
    found.setdefault(
      name,
      Setting(
        name,
        "distill",
        **digits_net,
        lr=digits.distill.lr_teacher,
        ipc=digits.distill.ipc,
        syn_steps=steps,
        data="digits",
      ),
    )
  found["digits_expert"] = Setting(
    "digits_expert",
    "expert",
    **digits_net,
    lr=digits.experts.lr,
    num_train=len(digits_dataset().train_labels),
    batch_size=digits.experts.batch_size,
    momentum=digits.experts.momentum,
    data="digits",
  )
  for ipc in (1, 10):
    paper = paper_lib.paper_config("cifar10", ipc)
    cifar_net = dict(
      image_size=32, channels=3, num_classes=10, width=paper.model.width, depth=paper.model.depth
    )
    for steps in (20, 30, 40, 80):
      name = f"cifar10_ipc{ipc}_s{steps}"
      found[name] = Setting(
        name, "distill", **cifar_net, lr=paper.distill.lr_teacher, ipc=ipc, syn_steps=steps
      )
  paper = paper_lib.paper_config("cifar10", 10)
  found["cifar10_expert"] = Setting(
    "cifar10_expert",
    "expert",
    image_size=32,
    channels=3,
    num_classes=10,
    width=paper.model.width,
    depth=paper.model.depth,
    lr=paper.experts.lr,
    num_train=50000,
    batch_size=paper.experts.batch_size,
    momentum=paper.experts.momentum,
  )
  return found


DEFAULT_SETTINGS = (
  "digits",
  "digits_s40",
  "digits_s80",
  "cifar10_ipc1_s20",
  "cifar10_ipc1_s40",
  "cifar10_ipc1_s80",
  "cifar10_ipc10_s20",
  "cifar10_ipc10_s40",
  "cifar10_ipc10_s80",
  "digits_expert",
)


def resolve_settings(spec: str) -> list[Setting]:
  """Settings named by a comma-separated list, "default" or "all"; ValueError for unknown names."""
  known = all_settings()
  if spec == "all":
    return list(known.values())
  names = DEFAULT_SETTINGS if spec == "default" else [s.strip() for s in spec.split(",") if s]
  unknown = [name for name in names if name not in known]
  if unknown:
    raise ValueError(f"unknown setting(s) {', '.join(unknown)}; see --list")
  return [known[name] for name in names]


@dataclasses.dataclass
class Problem:
  """Inputs of one setting: flax parameter trees and NHWC numpy data."""

  params: Any  # Initial parameters (flax tree).
  target: Any  # distill: the expert target w* (flax tree); expert: unused (None).
  images: np.ndarray  # distill: the synthetic set; expert: the training set.
  labels: np.ndarray


def _target_leaf(layer: str, key: str, value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One leaf of the stand-in expert target: w_0 + TARGET_OFFSET * N(0, 1).

  Conv biases stay put: instance norm cancels them, so their gradient is zero
  and a real expert does not move them.
  """
  if layer.startswith("conv_") and key == "bias":
    return np.array(value, np.float32)
  return (value + TARGET_OFFSET * rng.standard_normal(value.shape)).astype(np.float32)


def make_problem(setting: Setting, seed: int, dtype=np.float32) -> Problem:
  """Deterministic parameters and data for `setting` (digits images or N(0, 1) noise).

  Everything is made in float32, then cast to `dtype` (float64 problems hold
  exactly the float32 values).
  """
  net = setting.network()
  params = jax.tree_util.tree_map(
    lambda p: np.asarray(p, np.float32),
    jax.device_get(models.init_params(net.module, setting.image_shape, jax.random.PRNGKey(seed))),
  )
  cast = lambda tree: jax.tree_util.tree_map(
    lambda a: np.asarray(a, np.float32).astype(dtype), tree
  )
  rng = np.random.default_rng(seed)
  if setting.data == "digits":
    dataset = digits_dataset()
    train_x = preprocess.fit_preprocessor(dataset.train_images).apply(dataset.train_images)
    train_y = dataset.train_labels
  else:
    num = setting.num_train if setting.kind == "expert" else setting.ipc * setting.num_classes
    train_x = rng.standard_normal((num,) + setting.image_shape, np.float32)
    train_y = (
      np.arange(num) % setting.num_classes
      if setting.kind == "distill"
      else rng.integers(0, setting.num_classes, num)
    )
  if setting.kind == "expert":
    return Problem(
      cast(params),
      None,
      cast(train_x[: setting.num_train]),
      np.asarray(train_y, np.int64)[: setting.num_train],
    )
  # Synthetic set: the first `ipc` training images of each class, class-major.
  chosen = np.concatenate(
    [np.flatnonzero(train_y == c)[: setting.ipc] for c in range(setting.num_classes)]
  )
  target = {
    name: {key: _target_leaf(name, key, value, rng) for key, value in leaf.items()}
    for name, leaf in params.items()
  }
  return Problem(
    cast(params), cast(target), cast(train_x[chosen]), np.asarray(train_y[chosen], np.int64)
  )
