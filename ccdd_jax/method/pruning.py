"""Channel pruning of the last conv block (the paper's eq. 7).

Stage I's fine-pruning-enhanced experts (eq. 8) train against a copy whose
least-active channels are cut; the neuron-pruning and fine-pruning attacks
(threats.model_attacks) cut the same way. Pure functions of an `apply_fn`.
"""

import jax
import jax.numpy as jnp


def channel_activations(apply_fn, params, clean_images: jax.Array) -> jax.Array:
  """Mean post-ReLU activation per channel of the last conv block on clean images."""
  _, features = apply_fn(params, clean_images, return_features=True)
  return jnp.mean(features, axis=(0, 1, 2))


def prune_mask(activations: jax.Array, prune_ratio: float) -> jax.Array:
  """Mask (1 keep, 0 prune) that removes the `prune_ratio` least-active channels."""
  num_channels = activations.shape[0]
  num_pruned = int(round(prune_ratio * num_channels))
  ranks = jnp.argsort(jnp.argsort(activations))  # 0 = least active
  return (ranks >= num_pruned).astype(activations.dtype)
