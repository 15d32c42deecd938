r"""Times MTT's distillation iteration and expert epoch in ccdd_jax and in PyTorch, side by side.

  pip install -e '.[bench]'                                  # torch, for the PyTorch side
  python benchmarks/vs_pytorch.py                            # the default settings (slow on CPU)
  python benchmarks/vs_pytorch.py --settings digits --repeats 3
  python benchmarks/vs_pytorch.py --quick --settings digits,digits_expert   # smoke test
  python benchmarks/vs_pytorch.py --settings cifar10_ipc1_s20 --float64_check --json out.json
  python benchmarks/vs_pytorch.py --frameworks jax --settings cifar10_ipc10_s30   # no torch needed
  python benchmarks/vs_pytorch.py --list                     # every setting and its shapes

The JAX side is the project's own code path: `distill.make_meta_loss` under
`jax.jit(jax.value_and_grad(argnums=(0, 1)))` with `models.ConvNet`
(`--conv_impl`, default "auto" = shift convolutions on CPU), and `experts.make_trainer`
for one epoch. The PyTorch side (`torch_mtt.py`) is the reference
implementation's computation: a flat parameter vector, N steps with
`torch.autograd.grad(create_graph=True)`, the normalised distance, backward
to the images and the step size; and a plain `torch.optim.SGD` epoch. Both
start from the same parameters and data, batch_syn = the whole synthetic set,
and neither applies DSA (strategy "none").

Per setting, each step in a fresh subprocess:
1. Peak memory, per framework: on CPU, the growth of the resident set during
   the first run after set-up and compilation (VmHWM - VmRSS, the high-water
   mark reset just before the run through /proc/self/clear_refs); on GPU, the
   allocator's peak bytes in use. For JAX also the compiled executable's temp
   buffers (`memory_analysis()`). A framework whose run does not fit
   (--max_rss_gb, default 90% of the memory available at start) is not timed.
2. Timing: each side runs once (JAX's compile time is reported apart), the
   results are compared, then the two alternate `--repeats` times (the order
   flips every round) and the medians are reported. The comparison: loss,
   image gradient and step-size gradient (expert: the parameter update after
   one epoch over the same minibatches), relative L2 error of JAX against
   torch, allowed up to max(rtol, 3 x torch's own float32 spread) — the gap
   between torch's two float32 convolution paths — because on CIFAR shapes
   the image gradient is ill-conditioned enough that float32 puts either
   framework a few 1e-3 away from float64 (IPC 1, 20 steps).
3. With --float64_check: both sides in float64 (they must agree to 1e-8),
   and each side's float32 error against float64.

The 1-minute load average is recorded around each timing run: on a machine
with other work running, the medians are not comparable (torch's OpenMP
threads suffer most).

The exit status is 1 when a parity check fails or a worker fails.
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccdd_jax import data as data_lib
from ccdd_jax import distill
from ccdd_jax import experts
from ccdd_jax import inner_loop
from ccdd_jax import models
from ccdd_jax import settings as settings_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = pathlib.Path(__file__).resolve().parent
FRAMEWORKS = ("jax", "torch")
NO_DSA = ml_collections.ConfigDict({"strategy": "none"})
TARGET_OFFSET = 0.01  # w* = w_0 + TARGET_OFFSET * N(0, 1): a stand-in expert target.


# ---------------------------------------------------------------------------
# Settings.


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
      return (f"{self.num_classes * self.ipc} imgs {hwc} (ipc {self.ipc}), {net}, "
              f"{self.syn_steps} steps")
    steps = self.num_train // self.batch_size
    return f"{self.num_train} imgs {hwc}, batch {self.batch_size} x {steps} steps, {net}"


def _load_config_file(name: str) -> ml_collections.ConfigDict:
  """`get_config()` of configs/<name>.py."""
  spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@functools.lru_cache(maxsize=None)
def _digits_dataset() -> data_lib.Dataset:
  """The digits split the digits config trains on."""
  config = _load_config_file("digits")
  return data_lib.load_digits(config.data.test_fraction, config.data.split_seed)


@functools.lru_cache(maxsize=None)
def all_settings() -> dict[str, Setting]:
  """Every named setting: digits (configs/digits.py) and CIFAR-10 shapes (paper configs)."""
  found = {}
  digits = _load_config_file("digits")
  digits_net = dict(image_size=8, channels=1, num_classes=10, width=digits.model.width,
                    depth=digits.model.depth)
  for steps in (digits.distill.syn_steps, 40, 80):
    name = "digits" if steps == digits.distill.syn_steps else f"digits_s{steps}"
    found.setdefault(name, Setting(name, "distill", **digits_net, lr=digits.distill.lr_teacher,
                                   ipc=digits.distill.ipc, syn_steps=steps, data="digits"))
  found["digits_expert"] = Setting(
      "digits_expert", "expert", **digits_net, lr=digits.experts.lr,
      num_train=len(_digits_dataset().train_labels), batch_size=digits.experts.batch_size,
      momentum=digits.experts.momentum, data="digits")
  for ipc in (1, 10):
    paper = settings_lib.paper_config("cifar10", ipc)
    cifar_net = dict(image_size=32, channels=3, num_classes=10, width=paper.model.width,
                     depth=paper.model.depth)
    for steps in (20, 30, 40, 80):
      name = f"cifar10_ipc{ipc}_s{steps}"
      found[name] = Setting(name, "distill", **cifar_net, lr=paper.distill.lr_teacher, ipc=ipc,
                            syn_steps=steps)
  paper = settings_lib.paper_config("cifar10", 10)
  found["cifar10_expert"] = Setting(
      "cifar10_expert", "expert", image_size=32, channels=3, num_classes=10,
      width=paper.model.width, depth=paper.model.depth, lr=paper.experts.lr, num_train=50000,
      batch_size=paper.experts.batch_size, momentum=paper.experts.momentum)
  return found


DEFAULT_SETTINGS = ("digits", "digits_s40", "digits_s80",
                    "cifar10_ipc1_s20", "cifar10_ipc1_s40", "cifar10_ipc1_s80",
                    "cifar10_ipc10_s20", "cifar10_ipc10_s40", "cifar10_ipc10_s80",
                    "digits_expert")


def resolve_settings(spec: str) -> list[Setting]:
  """Settings named by a comma-separated list, "default" or "all"."""
  known = all_settings()
  if spec == "all":
    return list(known.values())
  names = DEFAULT_SETTINGS if spec == "default" else [s.strip() for s in spec.split(",") if s]
  unknown = [name for name in names if name not in known]
  if unknown:
    raise SystemExit(f"error: unknown setting(s) {', '.join(unknown)}; see --list")
  return [known[name] for name in names]


# ---------------------------------------------------------------------------
# Problem data (identical for both frameworks).


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
  net = models.ConvNet(num_classes=setting.num_classes, width=setting.width,
                       depth=setting.depth)
  params = jax.tree_util.tree_map(
      lambda p: np.asarray(p, np.float32),
      jax.device_get(models.init_params(net, setting.image_shape, jax.random.PRNGKey(seed))))
  cast = lambda tree: jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32).astype(dtype),
                                             tree)
  rng = np.random.default_rng(seed)
  if setting.data == "digits":
    dataset = _digits_dataset()
    train_x = data_lib.normalize(dataset.train_images, dataset.mean, dataset.std)
    train_y = dataset.train_labels
  else:
    num = setting.num_train if setting.kind == "expert" else setting.ipc * setting.num_classes
    train_x = rng.standard_normal((num,) + setting.image_shape, np.float32)
    train_y = (np.arange(num) % setting.num_classes if setting.kind == "distill"
               else rng.integers(0, setting.num_classes, num))
  if setting.kind == "expert":
    return Problem(cast(params), None, cast(train_x[:setting.num_train]),
                   np.asarray(train_y, np.int64)[:setting.num_train])
  # Synthetic set: the first `ipc` training images of each class, class-major.
  chosen = np.concatenate([np.flatnonzero(train_y == c)[:setting.ipc]
                           for c in range(setting.num_classes)])
  target = {name: {key: _target_leaf(name, key, value, rng) for key, value in leaf.items()}
            for name, leaf in params.items()}
  return Problem(cast(params), cast(target), cast(train_x[chosen]),
                 np.asarray(train_y[chosen], np.int64))


# ---------------------------------------------------------------------------
# Runners: prepare() once (JAX compiles), reset() before each run (untimed),
# run() the timed computation, result(out) numpy arrays in the torch layout.


class Runner:
  """One framework's computation for one setting."""
  compiled = None

  def prepare(self) -> float:
    """Compiles, where the framework compiles; returns the seconds it took."""
    return 0.0

  def reset(self):
    """Restores the starting state before a run (not timed)."""

  def run(self):
    """The timed computation; returns when its results are ready."""
    raise NotImplementedError


class _JaxRunner(Runner):
  """A jitted `self.function` applied to `self.args`, compiled ahead of time."""
  function: Any
  args: tuple

  def prepare(self) -> float:
    """Compiles; returns the seconds it took."""
    begin = time.perf_counter()
    self.compiled = self.function.lower(*self.args).compile()
    return time.perf_counter() - begin

  def run(self):
    """One call of the compiled executable, blocked on."""
    return jax.block_until_ready(self.compiled(*self.args))


def _jax_net(setting: Setting, conv_impl: str) -> models.ConvNet:
  """ccdd_jax's ConvNet for `setting`."""
  return models.ConvNet(num_classes=setting.num_classes, width=setting.width,
                        depth=setting.depth, conv_impl=models.resolve_conv_impl(conv_impl))


def _memory_analysis(compiled) -> dict:
  """Sizes from XLA's memory analysis of a compiled executable, if it has one."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend implements it.
    return {}
  if analysis is None:
    return {}
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "generated_code_size_in_bytes")
  return {f: int(getattr(analysis, f)) for f in fields if hasattr(analysis, f)}


class JaxDistill(_JaxRunner):
  """ccdd_jax's meta-gradient: value_and_grad of `distill.make_meta_loss` w.r.t. images and lr."""

  def __init__(self, setting: Setting, problem: Problem, conv_impl: str, seed: int,
               unroll: str = "1", remat: str = "none"):
    self.setting = setting
    net = _jax_net(setting, conv_impl)
    start, unravel = ravel_pytree(problem.params)
    target, _ = ravel_pytree(problem.target)
    apply_flat = lambda w, x: net.apply({"params": unravel(w)}, x)
    config = ml_collections.ConfigDict(
        {"syn_steps": setting.syn_steps, "batch_syn": 0, "beta": 0.0})
    scan_options = {"unroll": setting.syn_steps if unroll == "full" else int(unroll)}
    if remat != "none":  # Passed only when asked: older make_meta_loss has no `remat`.
      scan_options["remat"] = remat
    meta_loss = distill.make_meta_loss(config, apply_flat, NO_DSA, len(problem.labels),
                                       **scan_options)
    self.function = jax.jit(jax.value_and_grad(meta_loss, argnums=(0, 1)))
    self.args = (jnp.asarray(problem.images), jnp.asarray(setting.lr, problem.images.dtype),
                 jnp.asarray(problem.labels, jnp.int32), start, target, start, target,
                 jax.random.PRNGKey(seed))

  def result(self, out) -> dict:
    """Loss, image gradient (NCHW) and lr gradient as numpy arrays."""
    loss, (image_grad, lr_grad) = jax.device_get(out)
    return {"loss": np.asarray(loss, np.float64),
            "image_grad": np.asarray(image_grad).transpose(0, 3, 1, 2),
            "lr_grad": np.asarray(lr_grad, np.float64)}


def _expert_config(setting: Setting) -> ml_collections.ConfigDict:
  """An experts config for one clean epoch of `setting`."""
  return ml_collections.ConfigDict({
      "epochs": 1, "lr": setting.lr, "momentum": setting.momentum,
      "batch_size": setting.batch_size, "wm_batch_size": 1, "lambda1": 0.0, "lambda2": 0.0,
      "lambda3": 0.0, "prune_ratio": 0.5})


class JaxExpert(_JaxRunner):
  """One epoch of `experts.make_trainer("clean", ...)` (its own shuffle, no DSA)."""

  def __init__(self, setting: Setting, problem: Problem, conv_impl: str, seed: int):
    self.setting = setting
    self.net = _jax_net(setting, conv_impl)
    self.apply = models.make_apply(self.net)
    train = experts.make_trainer("clean", _expert_config(setting), self.apply, NO_DSA)
    self.function = jax.jit(train)
    params = jax.tree_util.tree_map(jnp.asarray, problem.params)
    data = {"train_images": jnp.asarray(problem.images),
            "train_labels": jnp.asarray(problem.labels, jnp.int32),
            "wm_images": jnp.zeros((1,) + setting.image_shape, jnp.float32),
            "wm_labels": jnp.zeros((1,), jnp.int32)}
    rng, family_rng = jax.random.split(jax.random.PRNGKey(seed))
    self.args = (params, params, rng, family_rng, data)

  def on_batches(self, params, images, labels, batches: np.ndarray):
    """End params of one epoch over the given minibatches [steps, batch] (the trainer's step)."""
    loss_fn = experts.expert_loss_fn("clean", _expert_config(self.setting), self.apply, NO_DSA)
    steps = batches.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(0), steps)
    step_inputs = {"images": jnp.asarray(images)[batches],
                   "labels": jnp.asarray(labels, jnp.int32)[batches],
                   "rng": keys, "family_rng": keys}
    lrs = jnp.full((steps,), self.setting.lr, images.dtype)
    epoch = jax.jit(lambda p, s: inner_loop.sgd_scan(
        loss_fn, p, s, lrs, momentum=self.setting.momentum)[0])
    return jax.device_get(epoch(params, step_inputs))


def _torch():
  """Imports torch and torch_mtt (only when the PyTorch side runs)."""
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  import torch  # pylint: disable=g-import-not-at-top
  import torch_mtt  # pylint: disable=g-import-not-at-top
  return torch, torch_mtt


def torch_device(requested: str) -> str:
  """Resolves "auto" to cuda when torch sees a GPU, else to cpu."""
  torch, _ = _torch()
  if requested == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  return requested


def _torch_shape(setting: Setting):
  """torch_mtt.ConvNetShape of `setting`."""
  _, torch_mtt = _torch()
  return torch_mtt.ConvNetShape(setting.image_size, setting.channels, setting.num_classes,
                                setting.width, setting.depth)


def _to_nchw(torch, images: np.ndarray, device: str):
  """NHWC numpy images as an NCHW tensor."""
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


class TorchDistill(Runner):
  """torch_mtt.distill_iteration on the same parameters, target and images."""

  def __init__(self, setting: Setting, problem: Problem, device: str, seed: int):
    self.torch, self.torch_mtt = _torch()
    torch = self.torch
    self.setting, self.device = setting, device
    self.net = _torch_shape(setting)
    to_flat = lambda tree: torch.from_numpy(self.torch_mtt.flax_to_torch_flat(tree, self.net))
    self.start = to_flat(problem.params).to(device)
    self.target = to_flat(problem.target).to(device)
    self.images = _to_nchw(torch, problem.images, device)
    self.labels = torch.from_numpy(problem.labels).to(device)
    self.lr = torch.tensor(setting.lr, dtype=self.images.dtype, device=device)
    self.generator = torch.Generator().manual_seed(seed)

  def run(self):
    """One distillation iteration (loss, image gradient, lr gradient)."""
    out = self.torch_mtt.distill_iteration(self.net, self.start, self.target, self.images,
                                           self.labels, self.lr, self.setting.syn_steps,
                                           self.generator)
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()
    return out

  def result(self, out) -> dict:
    """Loss, image gradient (NCHW) and lr gradient as numpy arrays."""
    loss, image_grad, lr_grad = (t.detach().cpu().numpy() for t in out)
    return {"loss": np.asarray(loss, np.float64), "image_grad": image_grad,
            "lr_grad": np.asarray(lr_grad, np.float64)}


class TorchExpert(Runner):
  """torch_mtt.expert_epoch: torch.optim.SGD over a fresh shuffle of the training set."""

  def __init__(self, setting: Setting, problem: Problem, device: str, seed: int):
    self.torch, self.torch_mtt = _torch()
    torch = self.torch
    self.setting, self.device = setting, device
    self.net = _torch_shape(setting)
    self.flat = torch.from_numpy(self.torch_mtt.flax_to_torch_flat(problem.params, self.net))
    self.flat = self.flat.to(device)
    self.images = _to_nchw(torch, problem.images, device)
    self.labels = torch.from_numpy(problem.labels).to(device)
    self.generator = torch.Generator().manual_seed(seed)
    self.params = self.optimizer = None

  def reset(self):
    """Fresh parameters (the initial ones) and a fresh optimiser."""
    self.params, self.optimizer = self.torch_mtt.make_expert(
        self.flat, self.net, self.setting.lr, self.setting.momentum)

  def run(self, batches=None):
    """One epoch over `batches`, or over a fresh shuffle; returns the flat end parameters."""
    if batches is None:  # The reference's DataLoader reshuffles every epoch.
      batches = self.torch_mtt.epoch_batches(len(self.labels), self.setting.batch_size,
                                             self.generator, self.device)
    self.torch_mtt.expert_epoch(self.net, self.params, self.optimizer, self.images,
                                self.labels, batches)
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()
    return self.torch_mtt.flatten(self.params)


def make_runner(framework: str, setting: Setting, problem: Problem, args) -> Runner:
  """The runner of `framework` for `setting`."""
  if framework == "jax":
    if setting.kind == "distill":
      return JaxDistill(setting, problem, args.conv_impl, args.seed, args.unroll, args.remat)
    return JaxExpert(setting, problem, args.conv_impl, args.seed)
  cls = TorchDistill if setting.kind == "distill" else TorchExpert
  return cls(setting, problem, args.torch_device, args.seed)


# ---------------------------------------------------------------------------
# Parity.


SPREAD_FACTOR = 3.0  # JAX may differ from torch by this many times torch's own float32 spread.
FLOAT64_RTOL = 1e-8  # Relative agreement required of the two sides in float64.


def _relative(a: np.ndarray, b: np.ndarray) -> dict:
  """max |a - b| and ||a - b|| / ||b|| (b the reference value)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  norm = float(np.linalg.norm(b.ravel()))
  diff = float(np.linalg.norm((a - b).ravel()))
  return {"max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0,
          "rel": diff / norm if norm else diff}


def compare_distill(result: dict, reference: dict) -> dict:
  """Errors of the loss, image gradient and lr gradient of `result` against `reference`."""
  return {key: _relative(result[key], reference[key]) for key in ("loss", "image_grad", "lr_grad")}


def fixed_batches(setting: Setting, seed: int) -> np.ndarray:
  """A seeded minibatch order [steps, batch] of one epoch (remainder dropped)."""
  steps = setting.num_train // setting.batch_size
  order = np.random.default_rng(seed).permutation(setting.num_train)
  return order[:steps * setting.batch_size].reshape(steps, setting.batch_size)


def jax_expert_end(jax_runner: JaxExpert, problem: Problem, batches: np.ndarray) -> np.ndarray:
  """JAX end parameters after one epoch over `batches`, as a torch-order flat vector."""
  end = jax_runner.on_batches(problem.params, problem.images, problem.labels, batches)
  return torch_mtt_flat(end, jax_runner.setting)


def torch_expert_end(torch_runner: TorchExpert, batches: np.ndarray) -> np.ndarray:
  """torch end parameters after one epoch over `batches` (flat)."""
  torch_runner.reset()
  torch_batches = torch_runner.torch.from_numpy(batches).to(torch_runner.device)
  return torch_runner.run(torch_batches).cpu().numpy()


def compare_expert(end: np.ndarray, reference_end: np.ndarray, start: np.ndarray) -> dict:
  """Errors of one epoch's parameter update (end - start) against a reference update."""
  return {"update": _relative(end - start, reference_end - start)}


@contextlib.contextmanager
def exact_torch_convolutions(torch):
  """Turns off oneDNN convolutions (CPU: im2col + GEMM) and TF32 (GPU) inside the block."""
  saved = (torch.backends.mkldnn.enabled, torch.backends.cudnn.allow_tf32,
           torch.backends.cuda.matmul.allow_tf32)
  torch.backends.mkldnn.enabled = False
  torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
  try:
    yield
  finally:
    (torch.backends.mkldnn.enabled, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved


def check_parity(setting: Setting, runners: dict, outputs: dict, problem: Problem, seed: int,
                 loss_rtol: float, grad_rtol: float) -> dict:
  """JAX against torch (as timed) in float32, with a tolerance scaled to float32 rounding.

  Some image gradients are ill-conditioned: on CIFAR shapes, float32 puts
  both frameworks a few 1e-3 (relative L2) away from a float64 evaluation.
  So torch is also run with its other float32 convolution path (oneDNN off
  on CPU, TF32 off on GPU); the gap between its two results is its float32
  spread, and JAX passes a quantity when its error against torch is within
  max(rtol, SPREAD_FACTOR * spread). `--float64_check` settles it exactly.
  """
  jax_runner, torch_runner = runners["jax"], runners["torch"]
  torch = torch_runner.torch
  if setting.kind == "distill":
    torch_result = torch_runner.result(outputs["torch"])
    errors = compare_distill(jax_runner.result(outputs["jax"]), torch_result)
    with exact_torch_convolutions(torch):
      spread = compare_distill(torch_runner.result(torch_runner.run()), torch_result)
    errors["loss"]["jax"] = float(outputs["jax"][0])
    errors["loss"]["torch"] = float(torch_result["loss"])
  else:
    batches = fixed_batches(setting, seed)
    start = torch_runner.flat.cpu().numpy()
    torch_end = torch_expert_end(torch_runner, batches)
    errors = compare_expert(jax_expert_end(jax_runner, problem, batches), torch_end, start)
    with exact_torch_convolutions(torch):
      spread = compare_expert(torch_expert_end(torch_runner, batches), torch_end, start)
  tolerance = {key: max(loss_rtol if key == "loss" else grad_rtol,
                        SPREAD_FACTOR * spread[key]["rel"]) for key in errors}
  ok = all(errors[key]["rel"] <= tolerance[key] for key in errors)
  return {"ok": bool(ok), "errors": errors, "torch_spread": spread, "tolerance": tolerance}


# ---------------------------------------------------------------------------
# Workers (each in a fresh process).


def _log(message: str):
  """A progress line on stderr."""
  print(message, file=sys.stderr, flush=True)


def environment(args) -> dict:
  """Versions, devices and threads of this process."""
  info = {"python": platform.python_version(), "jax": jax.__version__,
          "jax_backend": jax.default_backend(), "jax_device": jax.devices()[0].device_kind,
          "conv_impl": models.resolve_conv_impl(args.conv_impl), "unroll": args.unroll,
          "remat": args.remat,
          "cpu_cores": len(os.sched_getaffinity(0))}
  if "torch" in args.frameworks:
    torch, _ = _torch()
    info.update(torch=torch.__version__, torch_device=args.torch_device,
                torch_threads=torch.get_num_threads())
  return info


def _setup_torch(args):
  """Sets torch's thread count and resolves --torch_device."""
  torch, _ = _torch()
  torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
  args.torch_device = torch_device(args.torch_device)


def time_worker(setting: Setting, args) -> dict:
  """Warm-up, parity check, then alternating timed runs of the chosen frameworks."""
  if "torch" in args.frameworks:
    _setup_torch(args)
  problem = make_problem(setting, args.seed)
  result = {"setting": setting.name, "kind": setting.kind, "shapes": setting.describe(),
            "environment": environment(args), "load_average_start": os.getloadavg()[0]}
  runners, outputs = {}, {}
  for framework in args.frameworks:
    runner = make_runner(framework, setting, problem, args)
    compile_s = runner.prepare()
    runner.reset()
    begin = time.perf_counter()
    outputs[framework] = runner.run()
    first_s = time.perf_counter() - begin
    runners[framework] = runner
    result[framework] = {"compile_s": compile_s, "first_run_s": first_s}
    if framework == "jax":
      result[framework]["xla_memory"] = _memory_analysis(runner.compiled)
    _log(f"[{setting.name}] {framework}: compile {compile_s:.2f} s, first run {first_s:.2f} s")
  if len(runners) == 2:
    result["parity"] = check_parity(setting, runners, outputs, problem, args.seed,
                                    args.loss_rtol, args.grad_rtol)
    _log(f"[{setting.name}] parity: {_parity_text(result['parity'])}")
  del outputs
  times = {framework: [] for framework in runners}
  for repeat in range(args.repeats):
    order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
    for framework in order:
      runners[framework].reset()
      begin = time.perf_counter()
      runners[framework].run()
      times[framework].append(time.perf_counter() - begin)
  result["load_average_end"] = os.getloadavg()[0]
  for framework, seconds in times.items():
    result[framework]["times_s"] = seconds
    result[framework]["median_s"] = statistics.median(seconds) if seconds else None
    if seconds:
      _log(f"[{setting.name}] {framework}: median {1000 * statistics.median(seconds):.1f} ms "
           f"over {len(seconds)}")
  return result


def float64_worker(setting: Setting, args) -> dict:
  """Both frameworks in float64 (must agree) and in float32 (error against float64).

  The problems are drawn before x64 is turned on, so that they hold the same
  values as the timing run's; the float64 one is the float32 one upcast.
  """
  _setup_torch(args)
  problems = {name: make_problem(setting, args.seed, dtype)
              for name, dtype in (("float32", np.float32), ("float64", np.float64))}
  jax.config.update("jax_enable_x64", True)
  ends = {}
  for precision, problem in problems.items():
    for framework in FRAMEWORKS:
      runner = make_runner(framework, setting, problem, args)
      if setting.kind == "distill":
        runner.prepare()
        runner.reset()
        ends[(framework, precision)] = runner.result(runner.run())
      elif framework == "jax":
        ends[(framework, precision)] = jax_expert_end(runner, problem,
                                                      fixed_batches(setting, args.seed))
      else:
        ends[(framework, precision)] = torch_expert_end(runner, fixed_batches(setting, args.seed))
      _log(f"[{setting.name}] float64 check: {framework} {precision} done")
  if setting.kind == "distill":
    compare = compare_distill
  else:
    start = torch_mtt_flat(problems["float64"].params, setting)
    compare = lambda end, reference: compare_expert(end, reference, start)
  truth = ends[("jax", "float64")]
  agreement = compare(ends[("torch", "float64")], truth)
  return {"setting": setting.name,
          "ok": all(error["rel"] <= FLOAT64_RTOL for error in agreement.values()),
          "float64_torch_vs_jax": agreement,
          "float32_error_jax": compare(ends[("jax", "float32")], truth),
          "float32_error_torch": compare(ends[("torch", "float32")], truth)}


def torch_mtt_flat(params: Any, setting: Setting) -> np.ndarray:
  """A flax ConvNet parameter tree as the torch-order flat vector."""
  _, torch_mtt = _torch()
  return torch_mtt.flax_to_torch_flat(params, _torch_shape(setting))


def _status_kib() -> dict:
  """VmRSS and VmHWM of this process, in KiB."""
  values = {}
  with open("/proc/self/status") as status:
    for line in status:
      if line.startswith(("VmRSS:", "VmHWM:")):
        key, value = line.split(":")
        values[key] = int(value.split()[0])
  return values


def memory_worker(setting: Setting, framework: str, args) -> dict:
  """Peak memory of one run of `framework` on `setting`, after set-up and compilation."""
  if framework == "torch":
    _setup_torch(args)
  problem = make_problem(setting, args.seed)
  runner = make_runner(framework, setting, problem, args)
  runner.prepare()
  runner.reset()
  result = {"setting": setting.name, "framework": framework}
  on_gpu = (jax.default_backend() == "gpu" if framework == "jax"
            else args.torch_device.startswith("cuda"))
  if framework == "jax":
    result["xla_memory"] = _memory_analysis(runner.compiled)
    if args._out:  # pylint: disable=protected-access  # Kept if the run is killed.
      with open(args._out, "w") as out:  # pylint: disable=protected-access
        json.dump(result, out)
  if on_gpu:
    if framework == "torch":
      runner.torch.cuda.reset_peak_memory_stats()
    runner.run()
    if framework == "jax":
      stats = jax.devices()[0].memory_stats() or {}
      result["peak_bytes"] = stats.get("peak_bytes_in_use")
    else:
      result["peak_bytes"] = int(runner.torch.cuda.max_memory_allocated())
    result["method"] = "device allocator peak bytes in use"
    return result
  try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
      clear_refs.write("5")  # Resets VmHWM to the current VmRSS.
    method = "VmHWM - VmRSS over the run (high-water mark reset before it)"
  except OSError:
    method = "VmHWM - VmRSS over the run (high-water mark NOT reset: includes set-up)"
  before = _status_kib()
  runner.run()
  after = _status_kib()
  result.update(peak_bytes=1024 * (after["VmHWM"] - before["VmRSS"]),
                rss_before_bytes=1024 * before["VmRSS"], method=method)
  return result


# ---------------------------------------------------------------------------
# The parent: spawns workers, watches their memory, prints the tables.


def _rss_kib(pid: int) -> int:
  """Resident set of process `pid` in KiB (0 when it is gone)."""
  try:
    with open(f"/proc/{pid}/status") as status:
      for line in status:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _available_kib() -> int:
  """MemAvailable of this machine in KiB."""
  with open("/proc/meminfo") as meminfo:
    for line in meminfo:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1])
  return 0


def spawn_worker(mode: str, setting: Setting, args, frameworks: Sequence[str]) -> dict:
  """Runs a worker in a fresh Python process; kills it past --max_rss_gb or --timeout_s."""
  with tempfile.TemporaryDirectory() as tmp:
    out_path = os.path.join(tmp, "result.json")
    command = [sys.executable, os.path.abspath(__file__), "--_worker", mode, "--_out", out_path,
               "--settings", setting.name, "--frameworks", ",".join(frameworks),
               "--repeats", str(args.repeats), "--conv_impl", args.conv_impl,
               "--unroll", args.unroll, "--remat", args.remat,
               "--torch_device", args.torch_device, "--seed", str(args.seed),
               "--threads", str(args.threads), "--loss_rtol", str(args.loss_rtol),
               "--grad_rtol", str(args.grad_rtol)]
    env = dict(os.environ)
    if mode != "memory" and len(frameworks) == 2:
      # On a GPU, JAX would otherwise take 75% of its memory before torch runs.
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cap_kib = int(args.max_rss_gb * 1024 ** 2)
    begin = time.monotonic()
    process = subprocess.Popen(command, env=env)
    failure = None
    while True:
      try:
        process.wait(timeout=0.25)
        break
      except subprocess.TimeoutExpired:
        pass
      if _rss_kib(process.pid) > cap_kib:
        failure = f"killed: resident memory over --max_rss_gb={args.max_rss_gb:g}"
      elif time.monotonic() - begin > args.timeout_s:
        failure = f"killed: ran over --timeout_s={args.timeout_s:g}"
      if failure:
        process.kill()
        process.wait()
        break
    if failure is None and process.returncode != 0:
      failure = f"worker exited with status {process.returncode}"
    partial = {}
    if os.path.exists(out_path):  # Complete, or what a killed worker wrote before the run.
      with open(out_path) as result_file:
        partial = json.load(result_file)
    if failure is None:
      return partial
  _log(f"[{setting.name}] {mode} {','.join(frameworks)}: {failure}")
  return {**partial, "error": failure}


def _ms(seconds) -> str:
  """Seconds as milliseconds for the table."""
  return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _mb(num_bytes) -> str:
  """Bytes as MB for the table."""
  return "-" if num_bytes is None else f"{num_bytes / 1e6:.0f}"


def _memory_cell(memory: dict) -> str:
  """Peak MB of a memory worker, or why there is none."""
  if "error" in memory:
    return "killed" if memory["error"].startswith("killed") else "failed"
  return _mb(memory.get("peak_bytes"))


_SHORT_NAMES = {"loss": "loss", "image_grad": "img", "lr_grad": "lr", "update": "update"}


def _errors_text(errors: dict, spread: dict | None = None) -> str:
  """Relative errors per quantity, each with torch's own float32 spread in brackets."""
  parts = []
  for key, error in errors.items():
    part = f"{_SHORT_NAMES[key]} {error['rel']:.1e}"
    if spread is not None:
      part += f" ({spread[key]['rel']:.0e})"
    parts.append(part)
  return ", ".join(parts)


def _parity_text(parity: dict | None) -> str:
  """One cell summarising a parity check."""
  if not parity:
    return "-"
  return (("ok: " if parity["ok"] else "FAIL: ")
          + _errors_text(parity["errors"], parity["torch_spread"]))


def table(rows: list[dict], kind: str) -> str:
  """The markdown table of one kind of setting."""
  unit = "ms / iteration" if kind == "distill" else "ms / epoch"
  lines = [f"| setting | shapes | JAX {unit} | torch {unit} | torch / JAX | JAX compile s "
           "| JAX peak MB | XLA temp MB | torch peak MB | JAX vs torch (torch's f32 spread) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    timing = row.get("timing", {})
    jax_t = timing.get("jax", {}).get("median_s")
    torch_t = timing.get("torch", {}).get("median_s")
    ratio = f"{torch_t / jax_t:.2f}" if jax_t and torch_t else "-"
    compile_s = timing.get("jax", {}).get("compile_s")
    memory = row.get("memory", {})
    temp = memory.get("jax", {}).get("xla_memory", {}).get("temp_size_in_bytes")
    if temp is None:
      temp = timing.get("jax", {}).get("xla_memory", {}).get("temp_size_in_bytes")
    cells = [row["setting"], row["shapes"], _ms(jax_t), _ms(torch_t), ratio,
             "-" if compile_s is None else f"{compile_s:.1f}",
             _memory_cell(memory.get("jax", {})), _mb(temp),
             _memory_cell(memory.get("torch", {})), _parity_text(timing.get("parity"))]
    if "error" in timing:
      cells[-1] = timing["error"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_all(args) -> int:
  """Times every chosen setting and prints the tables; returns the exit status."""
  chosen = resolve_settings(args.settings)
  _log(f"settings: {', '.join(s.name for s in chosen)}; frameworks: "
       f"{', '.join(args.frameworks)}; {args.repeats} timed runs each")
  rows, environments, status = [], [], 0
  for setting in chosen:
    row = {"setting": setting.name, "kind": setting.kind, "shapes": setting.describe(),
           "memory": {}}
    if args.memory:  # First, so that a framework that runs out of memory is not timed.
      for framework in args.frameworks:
        row["memory"][framework] = spawn_worker("memory", setting, args, (framework,))
    fitting = [f for f in args.frameworks if "error" not in row["memory"].get(f, {})]
    row["timing"] = (spawn_worker("time", setting, args, fitting) if fitting
                     else {"error": "not timed: every framework failed its memory run"})
    if "environment" in row["timing"]:
      environments.append(row["timing"].pop("environment"))
    if args.float64_check:
      row["float64"] = (spawn_worker("float64", setting, args, FRAMEWORKS)
                        if len(fitting) == 2 else {"error": "skipped: a float32 run failed"})
    workers = [row["timing"], *row["memory"].values(), row.get("float64", {})]
    if (any("error" in worker for worker in workers)
        or not row["timing"].get("parity", {"ok": True})["ok"]
        or not row.get("float64", {"ok": True}).get("ok", True)):
      status = 1
    rows.append(row)
  env = environments[0] if environments else {}
  print(f"\n# JAX (ccdd_jax) vs PyTorch (MTT reference computation)\n")
  print(f"- python {env.get('python', '?')}, jax {env.get('jax', '?')} on "
        f"{env.get('jax_backend', '?')} ({env.get('jax_device', '?')}), conv_impl "
        f"{env.get('conv_impl', '?')}, unroll {args.unroll}, remat {args.remat}; XLA uses its "
        "default thread pool")
  if "torch" in env:
    print(f"- torch {env['torch']} on {env['torch_device']}, "
          f"{env['torch_threads']} intra-op threads")
  print(f"- {env.get('cpu_cores', '?')} CPU cores available; {args.repeats} alternating timed "
        "runs per framework (order flipped every round), medians reported; JAX compile "
        "time excluded from them and reported apart")
  print("- no DSA on either side (strategy \"none\"); batch_syn = the whole synthetic set; "
        "the optimiser step on the images is not timed; beta = 0 (no twin term)")
  print("- peak MB: on CPU, growth of the resident set over one run after set-up and "
        "compilation (VmHWM - VmRSS, fresh process per framework and setting); on GPU, the "
        "allocator's peak bytes in use. XLA temp MB: the executable's temp buffers "
        "(memory_analysis)")
  if len(args.frameworks) == 2:
    print("- JAX vs torch: relative L2 error of JAX against torch (as timed) on the same "
          "parameters and data after one run: loss, image gradient, lr gradient; expert: the "
          "parameter update after one epoch over the same minibatches. In brackets: torch's own "
          "float32 spread, the gap between its two convolution paths (oneDNN on/off on CPU, "
          f"TF32 on/off on GPU). ok when each error <= max(rtol, {SPREAD_FACTOR:g} x spread), "
          f"rtol {args.loss_rtol:g} for the loss, {args.grad_rtol:g} otherwise")
  for kind, title in (("distill", "Distillation iteration (meta-gradient)"),
                      ("expert", "Expert epoch")):
    kind_rows = [row for row in rows if row["kind"] == kind]
    if kind_rows:
      print(f"\n## {title}\n\n{table(kind_rows, kind)}")
  failures = [f"{row['setting']} {what}: {worker['error']}" for row in rows
              for what, worker in [("timing", row["timing"]), ("float64", row.get("float64", {})),
                                   *[(f"memory {f}", m) for f, m in row["memory"].items()]]
              if "error" in worker]
  if failures:
    print("\nFailures:\n" + "\n".join(f"- {failure}" for failure in failures))
  float64_rows = [row for row in rows if "float64" in row]
  if float64_rows:
    print(f"\n## Float64 check\n\nBoth sides in float64 must agree (relative error <= "
          f"{FLOAT64_RTOL:g}); then each side's float32 error against float64.\n")
    print("| setting | float64: torch vs JAX | float32 JAX error | float32 torch error |\n"
          "|---|---|---|---|")
    for row in float64_rows:
      check = row["float64"]
      if "error" in check:
        print(f"| {row['setting']} | {check['error']} | - | - |")
        continue
      print(f"| {row['setting']} | {'ok' if check['ok'] else 'FAIL'}: "
            f"{_errors_text(check['float64_torch_vs_jax'])} | "
            f"{_errors_text(check['float32_error_jax'])} | "
            f"{_errors_text(check['float32_error_torch'])} |")
  loads = [f"{row['setting']} {row['timing']['load_average_start']:.1f} -> "
           f"{row['timing']['load_average_end']:.1f}"
           for row in rows if "load_average_end" in row["timing"]]
  if loads:
    print(f"\nLoad average (1 min) at the start and end of each timing worker, for "
          f"{env.get('cpu_cores', '?')} cores (well above the core count = contended timings): "
          + "; ".join(loads))
  if args.json:
    with open(args.json, "w") as out:
      json.dump({"environment": env, "args": {k: v for k, v in vars(args).items()
                                              if not k.startswith("_")},
                 "results": rows}, out, indent=1)
    print(f"\nwrote {args.json}")
  return status


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--settings", default="default",
                      help="comma-separated names, 'default' or 'all' (see --list)")
  parser.add_argument("--frameworks", default="jax,torch", help="jax, torch or jax,torch")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per framework")
  parser.add_argument("--quick", action="store_true", help="1 timed run, no memory workers")
  parser.add_argument("--no_memory", dest="memory", action="store_false",
                      help="skip the peak-memory subprocesses")
  parser.add_argument("--float64_check", action="store_true",
                      help="also run both sides in float64 (must agree) and report each "
                      "side's float32 error against float64 (needs both frameworks)")
  parser.add_argument("--conv_impl", default="auto", help="auto, lax, im2col or shift (JAX side)")
  parser.add_argument("--unroll", default="1",
                      help="JAX distillation: scan steps per loop iteration (a count or 'full')")
  parser.add_argument("--remat", default=settings_lib.base_config().distill.remat,
                      help="JAX distillation: make_meta_loss's remat policy (default: the "
                      "config default; none: not passed, for commits before remat existed)")
  parser.add_argument("--torch_device", default="auto", help="auto, cpu or cuda")
  parser.add_argument("--threads", type=int, default=0,
                      help="torch intra-op threads (0: the CPU cores available)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--loss_rtol", type=float, default=1e-4)
  parser.add_argument("--grad_rtol", type=float, default=1e-3)
  parser.add_argument("--max_rss_gb", type=float, default=0.0,
                      help="kill a worker above this resident size (0: 90%% of MemAvailable)")
  parser.add_argument("--timeout_s", type=float, default=4 * 3600.0,
                      help="kill a worker running longer than this")
  parser.add_argument("--json", default="", help="also write all results to this file")
  parser.add_argument("--list", action="store_true", help="list the settings and exit")
  parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.frameworks = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
  if not args.frameworks or any(f not in FRAMEWORKS for f in args.frameworks):
    parser.error(f"--frameworks must name jax and/or torch, got {args.frameworks}")
  if args.quick:
    args.repeats, args.memory = 1, False
  if args.float64_check and len(args.frameworks) != 2:
    parser.error("--float64_check needs --frameworks jax,torch")
  if not args.max_rss_gb:
    args.max_rss_gb = 0.9 * _available_kib() / 1024 ** 2
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.list:
    for name, setting in all_settings().items():
      mark = "*" if name in DEFAULT_SETTINGS else " "
      print(f"{mark} {name:20} {setting.kind:8} {setting.describe()}")
    print("(* = in the default run)")
    return 0
  if args._worker:  # pylint: disable=protected-access
    (setting,) = resolve_settings(args.settings)
    if args._worker == "time":  # pylint: disable=protected-access
      result = time_worker(setting, args)
    elif args._worker == "float64":  # pylint: disable=protected-access
      result = float64_worker(setting, args)
    else:
      result = memory_worker(setting, args.frameworks[0], args)
    with open(args._out, "w") as out:  # pylint: disable=protected-access
      json.dump(result, out)
    return 0
  return run_all(args)


if __name__ == "__main__":
  sys.exit(main())
