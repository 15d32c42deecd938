"""The PyTorch baseline (benchmarks/torch_mtt.py) computes what ccdd_jax computes.

Tiny shapes (8x8x1, ConvNet width 8, depth 2): the same parameters and
images give the same logits, the same distillation loss and gradients, and
the same expert parameters after one epoch over the same minibatches.
"""

import jax
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

from benchmarks import parity
from benchmarks import runners
from benchmarks import vs_pytorch
from benchmarks import workers
from benchmarks.bench_settings import Setting
from benchmarks.bench_settings import make_problem
from ccdd_jax.method import models

torch = pytest.importorskip("torch")

from benchmarks import torch_mtt  # noqa: E402  (imports torch: after the skip)

TINY = dict(image_size=8, channels=1, num_classes=10, width=8, depth=2)

# The optional PyTorch baseline: several seconds a test (a torch and a JAX program each).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # Tiny tensors: threads only add noise.
  yield
  torch.set_num_threads(threads)


@pytest.mark.parametrize("conv_impl", ["lax", "im2col"])
def test_parameter_layout_gives_same_logits(conv_impl):
  net_shape = torch_mtt.ConvNetShape(**TINY)
  net = models.ConvNet(num_classes=10, width=8, depth=2, conv_impl=conv_impl)
  params = models.init_params(net, (8, 8, 1), jax.random.PRNGKey(3))
  noise = np.random.default_rng(4)
  params = jax.tree_util.tree_map(  # Non-trivial norm scales and biases too.
    lambda p: np.asarray(p + 0.1 * noise.standard_normal(p.shape), np.float32), params
  )
  images = np.random.default_rng(5).standard_normal((6, 8, 8, 1)).astype(np.float32)
  jax_logits = np.asarray(net.apply({"params": params}, images))
  flat = torch_mtt.flax_to_torch_flat(params, net_shape)
  assert flat.shape == (net_shape.num_params,) == ravel_pytree(params)[0].shape
  with torch.no_grad():
    torch_logits = torch_mtt.forward(
      torch_mtt.unflatten(torch.from_numpy(flat), net_shape),
      torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
      net_shape,
    ).numpy()
  np.testing.assert_allclose(jax_logits, torch_logits, rtol=1e-5, atol=1e-5)
  back = torch_mtt.torch_flat_to_flax(flat, net_shape)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


def test_distill_iteration_matches_meta_gradient():
  setting = Setting("tiny", "distill", **TINY, lr=0.05, ipc=2, syn_steps=5)
  problem = make_problem(setting, seed=0)
  jax_runner = runners.JaxDistill(setting, problem, "auto", seed=0)
  jax_runner.prepare()
  torch_runner = runners.TorchDistill(setting, problem, "cpu", seed=0)
  jax_result = jax_runner.result(jax_runner.run())
  torch_result = torch_runner.result(torch_runner.run())
  assert 0.5 < float(torch_result["loss"]) < 2.0
  scale = np.abs(torch_result["image_grad"]).max()
  assert scale > 0.0
  np.testing.assert_allclose(jax_result["loss"], torch_result["loss"], rtol=1e-5)
  np.testing.assert_allclose(jax_result["lr_grad"], torch_result["lr_grad"], rtol=1e-4)
  np.testing.assert_allclose(
    jax_result["image_grad"], torch_result["image_grad"], rtol=1e-4, atol=1e-5 * scale
  )
  errors = parity.compare_distill(jax_result, torch_result)
  assert errors["image_grad"]["rel"] < 1e-4, errors


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_expert_epoch_matches_trainer_step(momentum):
  setting = Setting(
    "tiny_expert", "expert", **TINY, lr=0.05, num_train=96, batch_size=16, momentum=momentum
  )
  problem = make_problem(setting, seed=1)
  jax_runner = runners.JaxExpert(setting, problem, "auto", seed=1)
  torch_runner = runners.TorchExpert(setting, problem, "cpu", seed=1)
  batches = parity.fixed_batches(setting, seed=1)
  assert batches.shape == (6, 16) and len(np.unique(batches)) == 96
  start = torch_runner.flat.numpy()
  jax_end = parity.jax_expert_end(jax_runner, problem, batches)
  torch_end = parity.torch_expert_end(torch_runner, batches)
  assert np.linalg.norm(torch_end - start) > 1e-3  # The epoch moved the parameters.
  errors = parity.compare_expert(jax_end, torch_end, start)
  assert errors["update"]["rel"] < 1e-4, errors
  np.testing.assert_allclose(jax_end, torch_end, rtol=0, atol=1e-5)


def test_time_worker_checks_parity_and_times_both():
  setting = Setting("tiny", "distill", **TINY, lr=0.05, ipc=1, syn_steps=2)
  args = vs_pytorch.parse_args(["--repeats", "2", "--threads", "1", "--torch_device", "cpu"])
  result = workers.time_worker(setting, args)
  assert result["parity"]["ok"], result["parity"]
  assert result["parity"]["errors"]["loss"]["rel"] < 1e-5
  for framework in ("jax", "torch"):
    assert len(result[framework]["times_s"]) == 2
    assert result[framework]["median_s"] > 0.0
  assert result["jax"]["compile_s"] > 0.0
