"""The JAX and PyTorch computations of one setting, ready to time.

Each runner: `prepare()` once (JAX compiles), `reset()` before each run (not
timed), `run()` the timed computation, and `result(out)` its outputs as numpy
arrays in the torch layout (NCHW). The JAX side is the project's own code
path (`distill.make_meta_loss`, `experts.make_trainer`); the PyTorch side is
`torch_mtt`, imported only when it runs, so that `--frameworks jax` needs no
torch. Neither applies DSA (strategy "none").
"""

import time
from typing import Any

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks.bench_settings import Problem
from benchmarks.bench_settings import Setting
from ccdd_jax.config import schema as settings_lib
from ccdd_jax.method import distill
from ccdd_jax.method import experts
from ccdd_jax.method import inner_loop

FRAMEWORKS = ("jax", "torch")


def no_dsa() -> ml_collections.ConfigDict:
  """The `dsa` config section with augmentation off (strategy "none")."""
  return settings_lib.section("dsa", strategy="none")


def import_torch():
  """torch and `benchmarks.torch_mtt` (imported only when the PyTorch side runs)."""
  import torch  # pylint: disable=g-import-not-at-top

  from benchmarks import torch_mtt  # pylint: disable=g-import-not-at-top

  return torch, torch_mtt


def torch_device(requested: str) -> str:
  """Resolves "auto" to cuda when torch sees a GPU, else to cpu."""
  torch, _ = import_torch()
  if requested == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  return requested


def torch_shape(setting: Setting):
  """torch_mtt.ConvNetShape of `setting`."""
  _, torch_mtt = import_torch()
  return torch_mtt.ConvNetShape(
    setting.image_size, setting.channels, setting.num_classes, setting.width, setting.depth
  )


def torch_flat(params: Any, setting: Setting) -> np.ndarray:
  """A flax ConvNet parameter tree as the torch-order flat vector."""
  _, torch_mtt = import_torch()
  return torch_mtt.flax_to_torch_flat(params, torch_shape(setting))


def _to_nchw(torch, images: np.ndarray, device: str):
  """NHWC numpy images as an NCHW tensor."""
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)


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


class JaxDistill(_JaxRunner):
  """ccdd_jax's meta-gradient: value_and_grad of `distill.make_meta_loss` w.r.t. images and lr."""

  def __init__(
    self,
    setting: Setting,
    problem: Problem,
    conv_impl: str,
    seed: int,
    unroll: str = "1",
    remat: str = "none",
  ):
    self.setting = setting
    network = setting.network(conv_impl)
    start, unravel = ravel_pytree(problem.params)  # The problem's dtype (float32 or float64).
    target, _ = ravel_pytree(problem.target)
    apply_flat = lambda w, x: network.apply(unravel(w), x)
    config = settings_lib.section("distill", syn_steps=setting.syn_steps, batch_syn=0, beta=0.0)
    scan_options = {"unroll": setting.syn_steps if unroll == "full" else int(unroll)}
    if remat != "none":  # Passed only when asked: older make_meta_loss has no `remat`.
      scan_options["remat"] = remat
    meta_loss = distill.make_meta_loss(
      config, apply_flat, no_dsa(), len(problem.labels), **scan_options
    )
    self.function = jax.jit(jax.value_and_grad(meta_loss, argnums=(0, 1)))
    self.args = (
      jnp.asarray(problem.images),
      jnp.asarray(setting.lr, problem.images.dtype),
      jnp.asarray(problem.labels, jnp.int32),
      start,
      target,
      start,
      target,
      jax.random.PRNGKey(seed),
    )

  def result(self, out) -> dict:
    """Loss, image gradient (NCHW) and lr gradient as numpy arrays."""
    loss, (image_grad, lr_grad) = jax.device_get(out)
    return {
      "loss": np.asarray(loss, np.float64),
      "image_grad": np.asarray(image_grad).transpose(0, 3, 1, 2),
      "lr_grad": np.asarray(lr_grad, np.float64),
    }


def _expert_config(setting: Setting) -> ml_collections.ConfigDict:
  """The `experts` config section for one clean epoch of `setting`."""
  return settings_lib.section(
    "experts",
    epochs=1,
    lr=setting.lr,
    momentum=setting.momentum,
    batch_size=setting.batch_size,
    wm_batch_size=1,
    lambda1=0.0,
    lambda2=0.0,
    lambda3=0.0,
    prune_ratio=0.5,
  )


class JaxExpert(_JaxRunner):
  """One epoch of `experts.make_trainer("clean", ...)` (its own shuffle, no DSA)."""

  def __init__(self, setting: Setting, problem: Problem, conv_impl: str, seed: int):
    self.setting = setting
    self.apply = setting.network(conv_impl).apply
    train = experts.make_trainer("clean", _expert_config(setting), self.apply, no_dsa())
    self.function = jax.jit(train)
    params = jax.tree_util.tree_map(jnp.asarray, problem.params)
    data = {
      "train_images": jnp.asarray(problem.images),
      "train_labels": jnp.asarray(problem.labels, jnp.int32),
      "wm_images": jnp.zeros((1,) + setting.image_shape, jnp.float32),
      "wm_labels": jnp.zeros((1,), jnp.int32),
    }
    rng, family_rng = jax.random.split(jax.random.PRNGKey(seed))
    self.args = (params, params, rng, family_rng, data)

  def on_batches(self, params, images, labels, batches: np.ndarray):
    """End params of one epoch over the given minibatches [steps, batch] (the trainer's step)."""
    loss_fn = experts.expert_loss_fn("clean", _expert_config(self.setting), self.apply, no_dsa())
    steps = batches.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(0), steps)
    step_inputs = {
      "images": jnp.asarray(images)[batches],
      "labels": jnp.asarray(labels, jnp.int32)[batches],
      "rng": keys,
      "family_rng": keys,
    }
    lrs = jnp.full((steps,), self.setting.lr, images.dtype)
    epoch = jax.jit(
      lambda p, s: inner_loop.sgd_scan(loss_fn, p, s, lrs, momentum=self.setting.momentum)[0]
    )
    return jax.device_get(epoch(params, step_inputs))


class TorchDistill(Runner):
  """torch_mtt.distill_iteration on the same parameters, target and images."""

  def __init__(self, setting: Setting, problem: Problem, device: str, seed: int):
    self.torch, self.torch_mtt = import_torch()
    torch = self.torch
    self.setting, self.device = setting, device
    self.net = torch_shape(setting)
    to_flat = lambda tree: torch.from_numpy(self.torch_mtt.flax_to_torch_flat(tree, self.net))
    self.start = to_flat(problem.params).to(device)
    self.target = to_flat(problem.target).to(device)
    self.images = _to_nchw(torch, problem.images, device)
    self.labels = torch.from_numpy(problem.labels).to(device)
    self.lr = torch.tensor(setting.lr, dtype=self.images.dtype, device=device)
    self.generator = torch.Generator().manual_seed(seed)

  def run(self):
    """One distillation iteration (loss, image gradient, lr gradient)."""
    out = self.torch_mtt.distill_iteration(
      self.net,
      self.start,
      self.target,
      self.images,
      self.labels,
      self.lr,
      self.setting.syn_steps,
      self.generator,
    )
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()
    return out

  def result(self, out) -> dict:
    """Loss, image gradient (NCHW) and lr gradient as numpy arrays."""
    loss, image_grad, lr_grad = (t.detach().cpu().numpy() for t in out)
    return {
      "loss": np.asarray(loss, np.float64),
      "image_grad": image_grad,
      "lr_grad": np.asarray(lr_grad, np.float64),
    }


class TorchExpert(Runner):
  """torch_mtt.expert_epoch: torch.optim.SGD over a fresh shuffle of the training set."""

  def __init__(self, setting: Setting, problem: Problem, device: str, seed: int):
    self.torch, self.torch_mtt = import_torch()
    torch = self.torch
    self.setting, self.device = setting, device
    self.net = torch_shape(setting)
    self.flat = torch.from_numpy(self.torch_mtt.flax_to_torch_flat(problem.params, self.net))
    self.flat = self.flat.to(device)
    self.images = _to_nchw(torch, problem.images, device)
    self.labels = torch.from_numpy(problem.labels).to(device)
    self.generator = torch.Generator().manual_seed(seed)
    self.params = self.optimizer = None

  def reset(self):
    """Fresh parameters (the initial ones) and a fresh optimiser."""
    self.params, self.optimizer = self.torch_mtt.make_expert(
      self.flat, self.net, self.setting.lr, self.setting.momentum
    )

  def run(self, batches=None):
    """One epoch over `batches`, or over a fresh shuffle; returns the flat end parameters."""
    if batches is None:  # The reference's DataLoader reshuffles every epoch.
      batches = self.torch_mtt.epoch_batches(
        len(self.labels), self.setting.batch_size, self.generator, self.device
      )
    self.torch_mtt.expert_epoch(
      self.net, self.params, self.optimizer, self.images, self.labels, batches
    )
    if self.device.startswith("cuda"):
      self.torch.cuda.synchronize()
    return self.torch_mtt.flatten(self.params)


def make_runner(framework: str, setting: Setting, problem: Problem, options) -> Runner:
  """The runner of `framework` for `setting`.

  `options` is the command line's namespace: conv_impl, unroll, remat,
  torch_device (resolved) and seed.
  """
  if framework == "jax":
    if setting.kind == "distill":
      return JaxDistill(
        setting, problem, options.conv_impl, options.seed, options.unroll, options.remat
      )
    return JaxExpert(setting, problem, options.conv_impl, options.seed)
  cls = TorchDistill if setting.kind == "distill" else TorchExpert
  return cls(setting, problem, options.torch_device, options.seed)
