"""The one SGD loop (`lax.scan` over a step function) that experts, distillation
and evaluation share, plus the losses they have in common."""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

Params = Any


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross entropy for integer labels (eq. 5)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sgd_scan(loss_fn: Callable[[Params, Any], jax.Array], params: Params, step_inputs: Any,
             learning_rates: jax.Array, *, momentum: float = 0.0, weight_decay: float = 0.0,
             velocity: Params | None = None, unroll: int = 1):
  """Runs one SGD step per leading slice of `step_inputs` inside `lax.scan`.

  `loss_fn(params, step_input)` returns the scalar loss of one step;
  `learning_rates` has one entry per step. Momentum and (coupled) weight decay
  follow torch.optim.SGD, as the MTT reference uses it. Returns the final
  params, the final velocity and the per-step losses.
  """
  if velocity is None:
    velocity = jax.tree_util.tree_map(jnp.zeros_like, params)

  def step(carry, inputs):
    params, velocity = carry
    step_input, lr = inputs
    loss, grads = jax.value_and_grad(loss_fn)(params, step_input)
    if weight_decay:
      grads = jax.tree_util.tree_map(lambda g, p: g + weight_decay * p, grads, params)
    if momentum:
      velocity = jax.tree_util.tree_map(lambda v, g: momentum * v + g, velocity, grads)
      grads = velocity
    params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    return (params, velocity), loss

  (params, velocity), losses = jax.lax.scan(
      step, (params, velocity), (step_inputs, learning_rates), unroll=unroll)
  return params, velocity, losses


def epoch_batches(rng: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
  """Indices [steps, batch] of one shuffled epoch (the remainder is dropped)."""
  batch_size = min(batch_size, num_examples)
  steps = num_examples // batch_size
  perm = jax.random.permutation(rng, num_examples)
  return perm[:steps * batch_size].reshape(steps, batch_size)

