"""The one SGD loop (`lax.scan` over a step function) that experts, distillation
and evaluation share, plus the losses they have in common."""

from collections.abc import Callable
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

Params = Any


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Mean cross entropy for integer labels (eq. 5), or for soft targets (rows of probabilities
  [..., K], learned soft labels); against `smooth_targets` if smoothing > 0."""
  soft = labels.ndim == logits.ndim
  if not soft and not smoothing:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  targets = labels if soft else jax.nn.one_hot(labels, logits.shape[-1])
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """Label smoothing (Szegedy et al. 2016): (1 - s) one_hot(labels) + s / K; rows sum to 1."""
  return optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)


# Rematerialisation of the scan body (what the backward pass through the loop
# stores): "none" keeps every activation of every step; "full" stores only each
# step's carry (the params) and recomputes the step; "dots" also keeps matmul
# results without batch dimensions; "nested" stores the carry every ~sqrt(N)
# steps only (a two-level scan whose segments are recomputed, steps inside
# them as "full"), so its stored carries grow as 2 sqrt(N) instead of N.
# "auto" is "nested" where the carry is large against one step's intermediates
# (few images, a big network: CIFAR-10 IPC 1) and "full" elsewhere.
REMAT_POLICIES = ("auto", "none", "full", "dots", "nested")

# "auto" takes "nested" when one step's intermediates are under this many times
# the carry. With "full", XLA's temp memory at N steps is about N carries + M,
# and M (measured, benchmarks/memory.py) is about a quarter of the step's
# intermediates S: growth 20 -> 80 steps stays <= 1.25x iff M >= 220 carries,
# i.e. S >~ 900 carries. Digits: S = 2,157 carries, CIFAR-10 IPC 10: 2,760
# (full grows 1.11x / 1.07x); CIFAR-10 IPC 1: 286 (full grows 1.64x).
_AUTO_NESTED_BELOW = 1000


def _intermediate_bytes(jaxpr) -> int:
  """Bytes of every value a jaxpr's equations produce, inner jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += sum(
      v.aval.size * v.aval.dtype.itemsize for v in eqn.outvars if hasattr(v.aval, "size")
    )
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          total += _intermediate_bytes(sub)
  return total


def resolve_remat(remat: str, step: Callable, carry: Any, step_input: Any) -> str:
  """The policy "auto" stands for, given the scan's step, carry and one step's input."""
  if remat != "auto":
    return remat
  abstract = lambda tree: jax.tree_util.tree_map(
    lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
  )
  step_bytes = _intermediate_bytes(
    jax.make_jaxpr(step)(abstract(carry), abstract(step_input)).jaxpr
  )
  carry_bytes = sum(
    jnp.size(x) * jnp.result_type(x).itemsize for x in jax.tree_util.tree_leaves(carry)
  )
  return "nested" if step_bytes < _AUTO_NESTED_BELOW * carry_bytes else "full"


def resolve_unroll(unroll: int | str, num_steps: int) -> int:
  """Scan steps per loop iteration for a config's `unroll` ("auto", "full" or a count)."""
  if unroll == "auto":
    # Rolled on every backend. CPU (benchmarks/inner_loop.py, docs/performance.md):
    # with "shift" convolutions the rolled scan is faster than the unrolled one
    # and compiles in constant time; GPU/TPU: not measured yet.
    unroll = 1
  if unroll == "full":
    return max(num_steps, 1)
  try:
    steps = int(unroll)
  except (TypeError, ValueError):
    steps = 0
  if steps < 1 or isinstance(unroll, bool):
    raise ValueError(f"unknown unroll {unroll!r}: use auto, full or a positive integer")
  return min(steps, max(num_steps, 1))


def _checkpointed(step: Callable, remat: str) -> Callable:
  """`step` wrapped in `jax.checkpoint` as the policy `remat` names."""
  if remat == "none":
    return step
  if remat == "dots":
    return jax.checkpoint(
      step, prevent_cse=False, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    )
  return jax.checkpoint(step, prevent_cse=False)  # "full" and "nested": save nothing.


def _nested_scan(step: Callable, carry: Any, xs: Any, length: int, unroll: int):
  """`lax.scan(step, carry, xs)` as ~sqrt(length) checkpointed segments of scans.

  The backward pass stores the carry at each segment boundary and, while it
  recomputes one segment, the carry of each step inside it. Leftover steps
  (length not a multiple of the segment) run as a plain scan after them.
  """
  segment = max(1, math.isqrt(length))
  num_segments = length // segment
  head = num_segments * segment

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def run_segment(carry, segment_xs):
    return jax.lax.scan(step, carry, segment_xs, unroll=min(unroll, segment))

  split = lambda x: x[:head].reshape((num_segments, segment) + x.shape[1:])
  carry, ys = jax.lax.scan(run_segment, carry, jax.tree_util.tree_map(split, xs))
  ys = jax.tree_util.tree_map(lambda y: y.reshape((head,) + y.shape[2:]), ys)
  if head < length:
    carry, tail = jax.lax.scan(
      step, carry, jax.tree_util.tree_map(lambda x: x[head:], xs), unroll=min(unroll, length - head)
    )
    ys = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a, b]), ys, tail)
  return carry, ys


def sgd_scan(
  loss_fn: Callable[[Params, Any], jax.Array],
  params: Params,
  step_inputs: Any,
  learning_rates: jax.Array,
  *,
  momentum: float = 0.0,
  weight_decay: float = 0.0,
  velocity: Params | None = None,
  unroll: int = 1,
  remat: str = "none",
):
  """Runs one SGD step per leading slice of `step_inputs` inside `lax.scan`.

  `loss_fn(params, step_input)` returns the scalar loss of one step;
  `learning_rates` has one entry per step. Momentum and (coupled) weight decay
  follow torch.optim.SGD, as the MTT reference uses it. `unroll` steps run per
  loop iteration and `remat` (one of REMAT_POLICIES) sets what the backward
  pass stores; neither changes the result beyond float rounding. Returns the
  final params, the final velocity and the per-step losses.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"unknown remat policy {remat!r}: use {', '.join(REMAT_POLICIES)}")
  if velocity is None:
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)

  def step(carry, inputs):
    # Without momentum the velocity is constant: it stays out of the carry,
    # so that the backward pass does not store a copy of it per step.
    params, velocity = carry if momentum else (carry, None)
    step_input, lr = inputs
    loss, grads = jax.value_and_grad(loss_fn)(params, step_input)
    if weight_decay:
      grads = jax.tree_util.tree_map(lambda g, p: g + weight_decay * p, grads, params)
    if momentum:
      velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
      grads = velocity
    params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    return ((params, velocity) if momentum else params), loss

  carry = (params, velocity) if momentum else params
  xs = (step_inputs, learning_rates)
  length = learning_rates.shape[0]
  remat = resolve_remat(remat, step, carry, jax.tree_util.tree_map(lambda x: x[0], xs))
  step = _checkpointed(step, remat)
  if remat == "nested" and length > 1:
    carry, losses = _nested_scan(step, carry, xs, length, unroll)
  else:
    carry, losses = jax.lax.scan(step, carry, xs, unroll=unroll)
  params, velocity = carry if momentum else (carry, velocity)
  return params, velocity, losses


def epoch_batches(rng: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """Indices [steps, batch] of one shuffled epoch (the remainder is dropped)."""
  batch_size = min(batch_size, num_examples)
  steps = num_examples // batch_size
  perm = jax.random.permutation(rng, num_examples)
  return perm[: steps * batch_size].reshape(steps, batch_size)
