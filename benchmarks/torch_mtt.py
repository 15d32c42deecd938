r"""The MTT reference computation in PyTorch: the baseline `vs_pytorch.py` times.

It follows the PyTorch reference implementation of MTT (Cazenavette et al.
2022), written afresh here:

- `forward`: the reference ConvNet (`depth` blocks of Conv3x3 with padding 1
  -> GroupNorm(width groups, affine, eps 1e-5) ["instancenorm"] -> in-place
  ReLU -> 2x2 average pooling, then one Linear layer), evaluated on a FLAT
  parameter vector split into views, as the reference's ReparamModule does.
- `distill_iteration`: one distillation iteration of the reference: N SGD
  steps of a student on the synthetic set, each with
  `torch.autograd.grad(create_graph=True)`, the normalised distance
  ||w_N - w*||^2 / ||w_0 - w*||^2, and `backward()` to the images and the
  learnable step size. The optimiser step on the images is left out (the JAX
  side times the meta-gradient alone too).
- `expert_epoch`: one epoch of expert training (plain `torch.optim.SGD` over
  minibatches of real data: forward, cross entropy, zero_grad, backward, step).

Neither applies DSA: the benchmark times both frameworks without it. Shapes
are those of `ccdd_jax.models.ConvNet` (padding 1 in every block; the
reference pads the first convolution of 1-channel images by 3, which it means
for 28x28 MNIST), so that one set of parameters runs on both. Parameters move
between the two with `flax_to_torch_flat` / `torch_flat_to_flax`; images are
NCHW here and NHWC in ccdd_jax.
"""

from collections.abc import Sequence
import dataclasses
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

GROUP_NORM_EPS = 1e-5  # torch.nn.GroupNorm's default; ccdd_jax.models uses the same.


@dataclasses.dataclass(frozen=True)
class ConvNetShape:
  """Sizes of a ConvNet and of its square input images."""

  image_size: int
  channels: int
  num_classes: int
  width: int = 128
  depth: int = 3

  @property
  def feature_side(self) -> int:
    """Side of the last block's pooled feature map (floor halving per block)."""
    side = self.image_size
    for _ in range(self.depth):
      side //= 2
    return side

  def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of each parameter, in the reference module's `parameters()` order."""
    shapes = []
    in_channels = self.channels
    for block in range(self.depth):
      shapes += [
        (f"conv_{block}.weight", (self.width, in_channels, 3, 3)),
        (f"conv_{block}.bias", (self.width,)),
        (f"norm_{block}.weight", (self.width,)),
        (f"norm_{block}.bias", (self.width,)),
      ]
      in_channels = self.width
    shapes += [
      ("head.weight", (self.num_classes, self.width * self.feature_side**2)),
      ("head.bias", (self.num_classes,)),
    ]
    return shapes

  @property
  def num_params(self) -> int:
    """Length of the flat parameter vector."""
    return sum(int(np.prod(shape)) for _, shape in self.parameter_shapes())


def unflatten(flat: torch.Tensor, net: ConvNetShape) -> list[torch.Tensor]:
  """Views of `flat` shaped as the parameters (ReparamModule's split + view)."""
  shapes = [shape for _, shape in net.parameter_shapes()]
  sizes = [int(np.prod(shape)) for shape in shapes]
  return [part.view(shape) for part, shape in zip(torch.split(flat, sizes), shapes)]


def forward(
  params: Sequence[torch.Tensor], images: torch.Tensor, net: ConvNetShape
) -> torch.Tensor:
  """Logits of the reference ConvNet for NCHW `images`; `params` in `parameter_shapes` order."""
  x = images
  for block in range(net.depth):
    conv_w, conv_b, norm_w, norm_b = params[4 * block : 4 * block + 4]
    x = F.conv2d(x, conv_w, conv_b, padding=1)
    x = F.group_norm(x, net.width, norm_w, norm_b, eps=GROUP_NORM_EPS)
    x = F.relu(x, inplace=True)  # The reference uses nn.ReLU(inplace=True).
    x = F.avg_pool2d(x, kernel_size=2, stride=2)
  head_w, head_b = params[4 * net.depth :]
  return F.linear(x.reshape(x.shape[0], -1), head_w, head_b)


def distill_iteration(
  net: ConvNetShape,
  flat_start: torch.Tensor,
  target: torch.Tensor,
  images: torch.Tensor,
  labels: torch.Tensor,
  lr: torch.Tensor,
  syn_steps: int,
  generator: torch.Generator,
  batch_syn: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
  """One MTT iteration: returns (loss, d loss / d images, d loss / d lr), all detached.

  `batch_syn` 0 means the whole synthetic set every step. The minibatch order
  comes from `torch.randperm` with `generator`, as the reference draws it.
  """
  images = images.detach().requires_grad_(True)
  lr = lr.detach().requires_grad_(True)
  batch_syn = batch_syn or images.shape[0]
  student_params = [flat_start.detach().clone().requires_grad_(True)]
  index_chunks = []
  for _ in range(syn_steps):
    if not index_chunks:
      order = torch.randperm(images.shape[0], generator=generator).to(images.device)
      index_chunks = list(torch.split(order, batch_syn))
    indices = index_chunks.pop()
    logits = forward(unflatten(student_params[-1], net), images[indices], net)
    ce_loss = F.cross_entropy(logits, labels[indices])
    grad = torch.autograd.grad(ce_loss, student_params[-1], create_graph=True)[0]
    student_params.append(student_params[-1] - lr * grad)
  num_params = flat_start.numel()
  param_loss = F.mse_loss(student_params[-1], target, reduction="sum") / num_params
  param_dist = F.mse_loss(flat_start, target, reduction="sum") / num_params
  loss = param_loss / param_dist
  loss.backward()
  return loss.detach(), images.grad, lr.grad


def make_expert(
  flat_params: torch.Tensor,
  net: ConvNetShape,
  lr: float,
  momentum: float = 0.0,
  weight_decay: float = 0.0,
) -> tuple[list[torch.Tensor], torch.optim.SGD]:
  """Leaf parameter tensors copied from `flat_params` and their torch.optim.SGD."""
  params = [p.detach().clone().requires_grad_(True) for p in unflatten(flat_params, net)]
  optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
  return params, optimizer


def epoch_batches(
  num_examples: int, batch_size: int, generator: torch.Generator, device: Any = "cpu"
) -> torch.Tensor:
  """Indices [steps, batch] of one shuffled epoch (the remainder dropped, as ccdd_jax does)."""
  batch_size = min(batch_size, num_examples)
  steps = num_examples // batch_size
  order = torch.randperm(num_examples, generator=generator)
  return order[: steps * batch_size].view(steps, batch_size).to(device)


def expert_epoch(
  net: ConvNetShape,
  params: Sequence[torch.Tensor],
  optimizer: torch.optim.SGD,
  images: torch.Tensor,
  labels: torch.Tensor,
  batches: torch.Tensor,
) -> None:
  """One epoch of expert training over the minibatches `batches` [steps, batch], in place."""
  for indices in batches:
    loss = F.cross_entropy(forward(params, images[indices], net), labels[indices])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def flatten(params: Sequence[torch.Tensor]) -> torch.Tensor:
  """The flat vector of parameter tensors (detached)."""
  return torch.cat([p.detach().reshape(-1) for p in params])


def flax_to_torch_flat(params: Any, net: ConvNetShape) -> np.ndarray:
  """The torch flat vector (same dtype) of a `ccdd_jax.models.ConvNet` parameter tree.

  Conv kernels go from HWIO to OIHW; the dense kernel's rows go from the NHWC
  flatten order (h, w, c) to the NCHW one (c, h, w) and the matrix is
  transposed to torch's [out, in].
  """
  params = {name: {k: np.asarray(v) for k, v in leaf.items()} for name, leaf in params.items()}
  parts = []
  for block in range(net.depth):
    conv, norm = params[f"conv_{block}"], params[f"norm_{block}"]
    parts += [conv["kernel"].transpose(3, 2, 0, 1), conv["bias"], norm["scale"], norm["bias"]]
  side = net.feature_side
  kernel = params["head"]["kernel"].reshape(side, side, net.width, net.num_classes)
  parts += [kernel.transpose(3, 2, 0, 1), params["head"]["bias"]]
  return np.concatenate([part.reshape(-1) for part in parts])


def torch_flat_to_flax(flat: np.ndarray, net: ConvNetShape) -> dict:
  """The inverse of `flax_to_torch_flat`: a ConvNet parameter tree of numpy arrays."""
  flat = np.asarray(flat)
  sizes = [int(np.prod(shape)) for _, shape in net.parameter_shapes()]
  parts = [
    part.reshape(shape)
    for part, (_, shape) in zip(np.split(flat, np.cumsum(sizes)[:-1]), net.parameter_shapes())
  ]
  tree = {}
  for block in range(net.depth):
    conv_w, conv_b, norm_w, norm_b = parts[4 * block : 4 * block + 4]
    tree[f"conv_{block}"] = {"kernel": conv_w.transpose(2, 3, 1, 0), "bias": conv_b}
    tree[f"norm_{block}"] = {"scale": norm_w, "bias": norm_b}
  head_w, head_b = parts[4 * net.depth :]
  side = net.feature_side
  kernel = head_w.reshape(net.num_classes, net.width, side, side).transpose(2, 3, 1, 0)
  tree["head"] = {"kernel": kernel.reshape(-1, net.num_classes), "bias": head_b}
  return tree
