"""Stage III (part 1): train fresh networks on a set and measure Acc and Acc_W.

The protocol follows the MTT reference: SGD momentum 0.9, weight decay 5e-4,
the learned step size, lr x 0.1 halfway, DSA, `eval.epochs` epochs; several
seeds trained in parallel with `jax.vmap`. We report the mean and std of the
final evaluation over seeds, never the best over evaluation points. With a
mesh of several devices (sharding.py) the seeds axis is split over the
devices (padded to a multiple of their number; the padding is dropped).
"""

from collections.abc import Callable
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccdd_jax.devices import sharding
from ccdd_jax.method import augment
from ccdd_jax.method import inner_loop

# The sets every run evaluates: the watermarked distilled set, a clean distilled set made
# the same way for comparison, and the real training data.
SETS = ("distilled", "clean_distilled", "real")
DISTILLED_SETS = SETS[:2]


def make_set_trainer(
  apply_fn: Callable,
  dsa_config: ml_collections.ConfigDict,
  *,
  epochs: int,
  batch_size: int,
  momentum: float,
  weight_decay: float,
  label_smoothing: float = 0.0,
  extra_augment: Callable | None = None,
  remat: str = "none",
):
  """Returns `train(init_params, images, labels, lr, rng, family_rng) -> params`.

  `family_rng` picks the DSA family per step; it is shared by vmapped seeds.
  Robust training (data_threats.py) adds `label_smoothing` (inner_loop.smooth_targets)
  and `extra_augment(images, rng) -> images`, applied to every batch after DSA;
  without them the trainer is exactly MTT's evaluation. `remat` (inner_loop.REMAT_POLICIES)
  matters only to a caller that differentiates through the training (crafting.py).
  """

  def train(init_params, images, labels, lr, rng, family_rng):
    num = labels.shape[0]
    rng_batches, rng_aug = jax.random.split(rng)
    batches = jax.vmap(lambda r: inner_loop.epoch_batches(r, num, batch_size))(
      jax.random.split(rng_batches, epochs)
    )
    steps_per_epoch = batches.shape[1]
    batches = batches.reshape(epochs * steps_per_epoch, -1)
    total = batches.shape[0]
    # lr x 0.1 at the halfway epoch, as MTT's evaluation.
    half = (epochs // 2) * steps_per_epoch
    lrs = jnp.where(jnp.arange(total) < half, lr, lr * 0.1).astype(jnp.float32)

    def loss_fn(params, step_input):
      idx, rng_step, family_step = step_input
      if extra_augment is not None:
        rng_step, rng_extra = jax.random.split(rng_step)
      x = augment.augment(images[idx], rng_step, dsa_config, family_rng=family_step)
      if extra_augment is not None:
        x = extra_augment(x, rng_extra)
      return inner_loop.cross_entropy(apply_fn(params, x), labels[idx], label_smoothing)

    params, _, _ = inner_loop.sgd_scan(
      loss_fn,
      init_params,
      (batches, jax.random.split(rng_aug, total), jax.random.split(family_rng, total)),
      lrs,
      momentum=momentum,
      weight_decay=weight_decay,
      remat=remat,
    )
    return params

  return train


def as_targets(labels: Any) -> jax.Array:
  """Training targets: integer labels [N] as int32, soft labels [N, K] (probabilities) as float."""
  labels = jnp.asarray(labels)
  return labels.astype(jnp.float32 if labels.ndim == 2 else jnp.int32)


def make_networks_trainer(
  apply_fn: Callable,
  dsa_config: ml_collections.ConfigDict,
  *,
  epochs: int,
  batch_size: int,
  momentum: float = 0.9,
  weight_decay: float = 5e-4,
  mesh: Any = None,
  label_smoothing: float = 0.0,
  extra_augment: Callable | None = None,
) -> Callable[..., Any]:
  """Returns `train(init_params, images, labels, lr, rng) -> params`, compiled once per shape.

  One network per leading entry of `init_params` (vmapped seeds). Keep it to
  train several sets of the same shapes (the distilled and the clean
  distilled set) without compiling twice. With a `mesh` of several devices
  the seeds are split over it and the result comes back as numpy arrays.
  `label_smoothing` and `extra_augment`: `make_set_trainer`.
  """
  run = jax.jit(
    jax.vmap(
      make_set_trainer(
        apply_fn,
        dsa_config,
        epochs=epochs,
        batch_size=batch_size,
        momentum=momentum,
        weight_decay=weight_decay,
        label_smoothing=label_smoothing,
        extra_augment=extra_augment,
      ),
      in_axes=(0, None, None, None, 0, None),
    )
  )

  def train(init_params, images, labels, lr, rng):
    num_seeds = jax.tree_util.tree_leaves(init_params)[0].shape[0]
    rng, family_rng = jax.random.split(rng)
    seeds = (init_params, jax.random.split(rng, num_seeds))
    shared = (jnp.asarray(images), as_targets(labels), jnp.float32(lr), family_rng)
    if sharding.size(mesh) == 1:
      return run(seeds[0], *shared[:3], seeds[1], shared[3])
    seeds = sharding.put_leading(sharding.pad_leading(seeds, mesh), mesh)
    shared = sharding.put_replicated(shared, mesh)
    params = run(seeds[0], *shared[:3], seeds[1], shared[3])
    return sharding.unpad(sharding.to_host(params), num_seeds)

  return train


def train_on_sets(
  apply_fn: Callable,
  dsa_config: ml_collections.ConfigDict,
  eval_config: ml_collections.ConfigDict,
  init_params: Any,
  sets: dict,
  rng: jax.Array,
  on_start: Callable[[str], None] | None = None,
  mesh: Any = None,
):
  """Yields (name, stacked params, entry) for each set, trained from `init_params` (seeds).

  `sets` maps a name to {"images", "labels", "lr"[, "label_logits"]} (learned
  soft labels: the networks train on their softmax); the set named "real" is
  trained with `eval.real_*` (no "lr" needed), the others for `eval.epochs`
  with the lr they carry. Sets of one epochs and batch size share one
  compiled trainer. `entry` holds lr, epochs, num_images and seconds. `mesh`:
  the seeds split over several devices (make_networks_trainer).
  """
  trainers = {}
  for name, s in sets.items():
    start = time.time()
    if name == "real":
      lr, epochs, batch_size = (
        eval_config.real_lr,
        eval_config.real_epochs,
        eval_config.real_batch_size,
      )
    else:
      lr, epochs, batch_size = float(s["lr"]), eval_config.epochs, eval_config.batch_size
    if on_start is not None:
      on_start(
        f"on {name}: {len(s['labels'])} images x {epochs} epochs, "
        f"{jax.tree_util.tree_leaves(init_params)[0].shape[0]} networks (lr {lr:.4g}) ..."
      )
    if (epochs, batch_size) not in trainers:
      trainers[epochs, batch_size] = make_networks_trainer(
        apply_fn,
        dsa_config,
        epochs=epochs,
        batch_size=batch_size,
        momentum=eval_config.momentum,
        weight_decay=eval_config.weight_decay,
        mesh=mesh,
      )
    targets = jax.nn.softmax(s["label_logits"]) if "label_logits" in s else s["labels"]
    params = jax.device_get(
      trainers[epochs, batch_size](init_params, s["images"], targets, lr, rng)
    )
    yield (
      name,
      params,
      {"lr": lr, "epochs": epochs, "num_images": len(s["labels"]), "seconds": time.time() - start},
    )


def make_predictor(
  apply_fn: Callable, batch_size: int = 2048
) -> Callable[[Any, np.ndarray], np.ndarray]:
  """Returns `predict(stacked_params, images) -> [seeds, N]` class predictions, compiled once."""
  predict = jax.jit(jax.vmap(lambda p, x: jnp.argmax(apply_fn(p, x), -1), in_axes=(0, None)))

  def predictions(stacked_params, images):
    outs = [
      predict(stacked_params, jnp.asarray(images[s : s + batch_size]))
      for s in range(0, images.shape[0], batch_size)
    ]
    return np.concatenate([np.asarray(o) for o in outs], axis=1)

  return predictions


def summarize(values) -> dict:
  """{"mean", "std", "runs"} of per-seed figures (std with ddof=0, in percent units kept)."""
  values = [float(v) for v in values]
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "runs": values}
