"""Stage II: distillation by matching expert trajectories (eq. 9, 10).

Each iteration samples a watermarked expert e and a start epoch t, runs N SGD
steps of a student from theta*_t on augmented minibatches of the synthetic
set (eq. 9, inside `lax.scan`), and updates the synthetic images and the
learnable step size alpha by differentiating eq. 10 through all N steps:

  L = ||th_{t+N} - th*_{t+M}||^2 / ||th*_t - th*_{t+M}||^2
      + beta * ||th_{t+N} - th^Idx_{t+M}||^2 / ||th^Idx_t - th^Idx_{t+M}||^2

where Idx is the fine-pruning-enhanced twin of expert e (same initial
parameters). Parameters are flat vectors (`ravel_pytree`) in the inner loop.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ccdd_jax import CCDDError
from ccdd_jax import augment
from ccdd_jax import inner_loop
from ccdd_jax import watermark


def normalized_distance(params, start, target) -> jax.Array:
  """||params - target||^2 / ||start - target||^2 on flat vectors (one term of eq. 10)."""
  return jnp.sum(jnp.square(params - target)) / jnp.sum(jnp.square(start - target))


def init_synthetic(
  train_images: np.ndarray,
  train_labels: np.ndarray,
  num_classes: int,
  ipc: int,
  rng: np.random.Generator,
  *,
  patterns: np.ndarray | None = None,
  pattern_labels: np.ndarray | None = None,
  triggers_per_pattern: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Picks real uint8 images per class; optionally seeds slots with D_W images.

  With `triggers_per_pattern` = k > 0 (an option beyond the paper), k slots
  of class y_i are filled with training images of other classes stamped
  with pattern i, so the watermark starts inside the synthetic set. Returns
  images, labels and a bool mask of the trigger slots.
  """
  images, labels, from_trigger = [], [], []
  wm_count = np.zeros(num_classes, np.int64)
  if triggers_per_pattern:
    for label in pattern_labels:
      wm_count[label] += triggers_per_pattern
    if wm_count.max() > ipc:
      raise CCDDError(
        f"distill.triggers_per_pattern={triggers_per_pattern} needs {wm_count.max()} "
        f"slots in one class but ipc={ipc}"
      )
  for c in range(num_classes):
    pool = np.flatnonzero(train_labels == c)
    n_real = ipc - wm_count[c]
    if len(pool) < n_real:
      raise CCDDError(f"class {c} has {len(pool)} training images, fewer than ipc={ipc}")
    chosen = rng.choice(pool, size=n_real, replace=False)
    images.append(train_images[chosen])
    labels.append(np.full(n_real, c))
    from_trigger.append(np.zeros(n_real, bool))
    for i in np.flatnonzero(np.asarray(pattern_labels if triggers_per_pattern else []) == c):
      carriers = rng.choice(
        np.flatnonzero(train_labels != c), size=triggers_per_pattern, replace=False
      )
      images.append(
        watermark.stamp(train_images[carriers], patterns, np.full(triggers_per_pattern, i))
      )
      labels.append(np.full(triggers_per_pattern, c))
      from_trigger.append(np.ones(triggers_per_pattern, bool))
  return (
    np.concatenate(images),
    np.concatenate(labels).astype(np.int64),
    np.concatenate(from_trigger),
  )


def make_meta_loss(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  num_syn: int,
  unroll: int | str = 1,
  remat: str = "none",
  with_terms: bool = False,
):
  """Returns `loss(images, lr, labels, start, target, twin_start, twin_target, rng)` (eq. 10).

  `unroll` (see inner_loop.resolve_unroll) and `remat` (one of
  inner_loop.REMAT_POLICIES) set the speed and memory of the inner loop only.
  With `with_terms` it returns (loss, (expert term, twin term)).
  """
  syn_steps = distill_config.syn_steps
  batch_syn = min(distill_config.batch_syn or num_syn, num_syn)
  beta = distill_config.beta
  unroll = inner_loop.resolve_unroll(unroll, syn_steps)

  def student_loss(flat_params, step_input, images, labels):
    idx = step_input["idx"]
    batch = augment.augment(images[idx], step_input["rng"], dsa_config)
    return inner_loop.cross_entropy(apply_flat(flat_params, batch), labels[idx])

  def meta_loss(images, lr, labels, start, target, twin_start, twin_target, rng):
    rng_idx, rng_aug = jax.random.split(rng)
    idx = jax.vmap(lambda r: jax.random.permutation(r, num_syn)[:batch_syn])(
      jax.random.split(rng_idx, syn_steps)
    )
    step_inputs = {"idx": idx, "rng": jax.random.split(rng_aug, syn_steps)}
    final, _, _ = inner_loop.sgd_scan(  # eq. 9
      lambda w, s: student_loss(w, s, images, labels),
      start,
      step_inputs,
      jnp.full((syn_steps,), lr),
      unroll=unroll,
      remat=remat,
    )
    expert_term = normalized_distance(final, start, target)
    twin_term = (
      normalized_distance(final, twin_start, twin_target) if beta else jnp.zeros_like(expert_term)
    )
    loss = expert_term + beta * twin_term
    return (loss, (expert_term, twin_term)) if with_terms else loss

  return meta_loss


def make_distill_update(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  num_syn: int,
):
  """Returns the pure `update(state, trajectories, rng) -> (state, [loss, expert, twin])`.

  `trajectories` = (expert [E, T, P], twin [E, T, P]) flat parameters per
  epoch; `state` = {"images", "lr", "opt_state", "labels"} (see init_state).
  """
  meta_loss = make_meta_loss(
    distill_config,
    apply_flat,
    dsa_config,
    num_syn,
    unroll=distill_config.unroll,
    remat=distill_config.remat,
    with_terms=True,
  )
  optimizer = make_optimizer(distill_config)
  expert_epochs = distill_config.expert_epochs
  max_start = distill_config.max_start_epoch

  def update(state, trajectories, rng):
    expert, twin = trajectories
    rng_e, rng_t, rng_loss = jax.random.split(rng, 3)
    e = jax.random.randint(rng_e, (), 0, expert.shape[0])
    t = jax.random.randint(rng_t, (), 0, max_start + 1)
    (loss, terms), grads = jax.value_and_grad(meta_loss, argnums=(0, 1), has_aux=True)(
      state["images"],
      state["lr"],
      state["labels"],
      expert[e, t],
      expert[e, t + expert_epochs],
      twin[e, t],
      twin[e, t + expert_epochs],
      rng_loss,
    )
    trainable = {"images": state["images"], "lr": state["lr"]}
    updates, opt_state = optimizer.update(
      {"images": grads[0], "lr": grads[1]}, state["opt_state"], trainable
    )
    trainable = optax.apply_updates(trainable, updates)
    # A negative step size would make the student climb the loss.
    new_state = {
      "images": trainable["images"],
      "lr": jnp.maximum(trainable["lr"], 1e-6),
      "opt_state": opt_state,
      "labels": state["labels"],
    }
    return new_state, jnp.stack([loss, *terms])

  return update


def make_distill_step(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  num_syn: int,
):
  """The update of make_distill_update, jitted; the state it replaces is donated."""
  return jax.jit(
    make_distill_update(distill_config, apply_flat, dsa_config, num_syn), donate_argnums=(0,)
  )


def init_state(
  distill_config: ml_collections.ConfigDict, init_images: np.ndarray, labels: np.ndarray
) -> dict:
  """The distillation state on the default device: images, alpha = lr_teacher, optimiser."""
  images = jax.device_put(np.asarray(init_images, np.float32))
  lr = jax.device_put(np.float32(distill_config.lr_teacher))
  return {
    "images": images,
    "lr": lr,
    "opt_state": make_optimizer(distill_config).init({"images": images, "lr": lr}),
    "labels": jax.device_put(np.asarray(labels, np.int32)),
  }


def make_optimizer(distill_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum 0.5 on the images (lr_img) and on the step size (lr_lr), as MTT."""
  return optax.multi_transform(
    {
      "images": optax.sgd(distill_config.lr_img, momentum=0.5),
      "lr": optax.sgd(distill_config.lr_lr, momentum=0.5),
    },
    {"images": "images", "lr": "lr"},
  )


def distill(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  init_images: np.ndarray,
  labels: np.ndarray,
  trajectories: tuple[Any, Any],
  rng: jax.Array,
  progress: Callable[[int, float], None] | None = None,
) -> tuple[np.ndarray, float, np.ndarray]:
  """Runs all distillation iterations; returns images, learned lr, history [it, 3].

  The history holds eq. 10's total and its two terms (expert, twin) per iteration.
  """
  needed = distill_config.max_start_epoch + distill_config.expert_epochs
  available = trajectories[0].shape[1] - 1
  if needed > available:
    raise CCDDError(
      f"distill.max_start_epoch + distill.expert_epochs = {needed} exceeds the "
      f"{available} expert epochs stored"
    )
  step = make_distill_step(distill_config, apply_flat, dsa_config, init_images.shape[0])
  state = init_state(distill_config, init_images, labels)
  trajectories = jax.device_put(tuple(trajectories))
  rngs = list(jax.random.split(rng, distill_config.iterations))  # Device keys, sliced once.
  losses = []
  for it, rng_it in enumerate(rngs):
    # Nothing crosses between host and device here: an accidental transfer
    # (a NumPy input, a Python scalar argument) is an error, not a slowdown.
    with jax.transfer_guard("disallow"):
      state, loss = step(state, trajectories, rng_it)
    losses.append(loss)
    if progress is not None:
      progress(it, loss[0])  # A device scalar: the callback decides when to fetch it.
  losses = np.asarray(jax.device_get(losses), np.float64)
  if not np.all(np.isfinite(losses)):
    raise CCDDError(
      "distillation diverged (non-finite matching loss): lower distill.lr_img or distill.lr_lr"
    )
  return np.asarray(state["images"]), float(state["lr"]), losses
