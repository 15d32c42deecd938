"""Stage I: expert trajectories (clean, watermarked, fine-pruning-enhanced).

All three kinds share one trainer (SGD, DSA, one snapshot per epoch, as the
MTT reference trains its experts) and differ only in their loss:

  clean:        CE on D_C
  watermarked:  CE on D_C + l1 * CE on D_W + l2 * ||theta - theta0||^2     (eq. 6)
  fp_enhanced:  eq. 6 + l3 * CE on D_W of the fine-pruned model             (eq. 7, 8)

Options beyond the paper (off by default): `experts.trigger_safe_dsa` keeps the
stamped corner of D_W images out of DSA (augment.augment_keeping), and
`experts.fp_normal_last_epochs` = k trains the last k epochs of the
fp-enhanced experts with eq. 6 alone (the paper's "last 10 epochs ... using
the same procedure as the normal model training").

Expert i of every kind starts from the same initial parameters, and theta0 of
watermarked / fp-enhanced expert i is the final state of clean expert i, so
the fine-pruning-enhanced twin used by eq. 10 compares like with like.
Experts are trained in parallel: `jax.vmap` over groups of experts, and
several groups at once on a thread pool (`train_experts`). With a mesh of
several devices (sharding.py) each group's expert axis is split over the
devices (padded to a multiple of their number; the padding is dropped), so
each device trains its slice with the same vmapped program.
"""

from collections.abc import Callable
import functools
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccdd_jax import Preempted
from ccdd_jax.devices import parallel
from ccdd_jax.devices import sharding
from ccdd_jax.method import augment
from ccdd_jax.method import inner_loop
from ccdd_jax.method import pruning

KINDS = ("clean", "watermarked", "fp_enhanced")


def squared_distance(a, b) -> jax.Array:
  """||a - b||^2 over all leaves of two pytrees (eq. 4)."""
  leaves = jax.tree_util.tree_map(lambda x, y: jnp.sum(jnp.square(x - y)), a, b)
  return sum(jax.tree_util.tree_leaves(leaves))


def expert_loss_fn(
  kind: str,
  expert_config: ml_collections.ConfigDict,
  apply_fn,
  dsa_config: ml_collections.ConfigDict,
):
  """Loss of one expert step for `kind`; the three kinds differ only here."""
  lambda1 = expert_config.lambda1
  lambda2 = expert_config.lambda2
  lambda3 = expert_config.lambda3
  trigger_safe = expert_config.trigger_safe_dsa

  def loss_fn(params, batch):
    rng_clean, rng_wm = jax.random.split(batch["rng"])
    family_clean, family_wm = jax.random.split(batch["family_rng"])
    images = augment.augment(batch["images"], rng_clean, dsa_config, family_rng=family_clean)
    loss = inner_loop.cross_entropy(apply_fn(params, images), batch["labels"])
    if kind == "clean":
      return loss
    keep = batch["trigger_corner"] if trigger_safe else None  # [1, H, W, 1], 1 = the stamp.
    wm_images = augment.augment_keeping(
      batch["wm_images"], rng_wm, dsa_config, keep, family_rng=family_wm
    )
    loss += lambda1 * inner_loop.cross_entropy(apply_fn(params, wm_images), batch["wm_labels"])
    if lambda2:
      loss += lambda2 * squared_distance(params, batch["anchor"])
    if kind == "fp_enhanced" and lambda3:
      pruned_logits = apply_fn(params, wm_images, channel_mask=batch["channel_mask"])
      pruned_loss = inner_loop.cross_entropy(pruned_logits, batch["wm_labels"])
      # `enhance` = 0 in the last experts.fp_normal_last_epochs epochs: eq. 6 alone there.
      loss += batch.get("enhance", 1.0) * lambda3 * pruned_loss
    return loss

  return loss_fn


def make_epoch_trainer(
  kind: str,
  expert_config: ml_collections.ConfigDict,
  apply_fn,
  dsa_config: ml_collections.ConfigDict,
  unroll: int = 1,
):
  """Returns `epoch(params, anchor, rng_epoch, family_epoch, epoch_index, data) -> params`.

  One epoch of `make_trainer`; the resumable trainer calls it once per epoch.
  `epoch_index` (an int32 scalar, 0-based) decides whether eq. 8 applies in the
  last `experts.fp_normal_last_epochs` epochs of fine-pruning-enhanced experts.
  """
  if kind not in KINDS:
    raise ValueError(f"unknown expert kind {kind!r}")
  loss_fn = expert_loss_fn(kind, expert_config, apply_fn, dsa_config)
  normal_last = expert_config.fp_normal_last_epochs if kind == "fp_enhanced" else 0

  def epoch(params, anchor, rng_epoch, family_epoch, epoch_index, data):
    num_train = data["train_labels"].shape[0]
    num_wm = data["wm_labels"].shape[0]
    rng_perm, rng_wm, rng_aug = jax.random.split(rng_epoch, 3)
    batches = inner_loop.epoch_batches(rng_perm, num_train, expert_config.batch_size)
    steps = batches.shape[0]
    step_inputs = {
      "images": data["train_images"][batches],
      "labels": data["train_labels"][batches],
      "rng": jax.random.split(rng_aug, steps),
      "family_rng": jax.random.split(family_epoch, steps),
    }
    if kind != "clean":
      wm_idx = jax.random.randint(rng_wm, (steps, expert_config.wm_batch_size), 0, num_wm)
      step_inputs["wm_images"] = data["wm_images"][wm_idx]
      step_inputs["wm_labels"] = data["wm_labels"][wm_idx]
    # Constant per epoch; broadcast so the step function sees them per step.
    constants = {"anchor": anchor}
    if kind != "clean" and expert_config.trigger_safe_dsa:
      constants["trigger_corner"] = data["trigger_corner"]
    if normal_last:
      enhance = epoch_index < expert_config.epochs - normal_last
      constants["enhance"] = enhance.astype(jnp.float32)
    if kind == "fp_enhanced":
      activations = pruning.channel_activations(apply_fn, params, data["prune_images"])
      constants["channel_mask"] = pruning.prune_mask(activations, expert_config.prune_ratio)

    def step_loss(p, step_input):
      return loss_fn(p, {**step_input, **constants})

    lrs = jnp.full((steps,), expert_config.lr, jnp.float32)
    params, _, _ = inner_loop.sgd_scan(
      step_loss, params, step_inputs, lrs, momentum=expert_config.momentum, unroll=unroll
    )
    return params

  return epoch


def make_trainer(
  kind: str,
  expert_config: ml_collections.ConfigDict,
  apply_fn,
  dsa_config: ml_collections.ConfigDict,
  unroll: int = 1,
):
  """Returns `train(init_params, anchor, rng, family_rng, data) -> params per epoch`.

  `family_rng` picks the DSA family of each step; share it across vmapped
  experts so that only the chosen family is computed (see augment.augment).

  `data` holds normalised `train_images`, `train_labels`, `wm_images`,
  `wm_labels` and `prune_images` (clean images that rank channels for the
  fine-pruned model), and `trigger_corner` [1, H, W, 1] where
  `experts.trigger_safe_dsa` is set. The result has a leading axis of epochs + 1 (epoch 0 =
  the initial parameters).
  """
  one_epoch = make_epoch_trainer(kind, expert_config, apply_fn, dsa_config, unroll)

  def train(init_params, anchor, rng, family_rng, data):
    def epoch(params, rngs):
      params = one_epoch(params, anchor, *rngs, data)
      return params, params

    _, trajectory = jax.lax.scan(
      epoch,
      init_params,
      (
        jax.random.split(rng, expert_config.epochs),
        jax.random.split(family_rng, expert_config.epochs),
        jnp.arange(expert_config.epochs),
      ),
    )
    return jax.tree_util.tree_map(
      lambda a, b: jnp.concatenate([a[None], b]), init_params, trajectory
    )

  return train


def train_experts(
  kind: str,
  expert_config: ml_collections.ConfigDict,
  apply_fn,
  dsa_config: ml_collections.ConfigDict,
  init_params: Any,
  anchors: Any,
  rng: jax.Array,
  data: dict,
  *,
  concurrency: int = 0,
  on_group_done: Callable[[int, int], None] | None = None,
) -> Any:
  """Trains stacked experts in parallel; returns params [experts, epochs + 1, ...].

  `init_params` and `anchors` have a leading experts axis (anchors may be
  the init params for clean experts, where they are unused). Experts run
  `expert_config.group_size` at a time in one vmapped program (0 = all of
  them), and `concurrency` such programs at once on a thread pool (0 = auto,
  `resolve_concurrency`). The group size sets the float rounding (vmapped ops sum in
  another order); concurrency does not change a bit. On CPU, XLA keeps about
  one core busy per program, so concurrent programs are what use the rest
  (docs/performance.md). `on_group_done(done, total)` reports progress.
  """
  train = jax.jit(
    jax.vmap(make_trainer(kind, expert_config, apply_fn, dsa_config), in_axes=(0, 0, 0, None, None))
  )
  num_experts = jax.tree_util.tree_leaves(init_params)[0].shape[0]
  rng, family_rng = jax.random.split(rng)
  rngs = jax.random.split(rng, num_experts)
  group = expert_config.get("group_size", 0) or num_experts
  starts = list(range(0, num_experts, group))
  take = lambda tree, s: jax.tree_util.tree_map(lambda x: x[s : s + group], tree)
  inputs = [
    (take(init_params, s), take(anchors, s), rngs[s : s + group], family_rng, data) for s in starts
  ]
  compiled = {}  # Compiled before the threads start, once per group size.
  for args in inputs:
    size = args[2].shape[0]
    if size not in compiled:
      compiled[size] = train.lower(*args).compile()
  outs = parallel.run_concurrently(
    lambda *args: compiled[args[2].shape[0]](*args),
    inputs,
    parallel.resolve_concurrency(concurrency),
    on_group_done,
  )
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *outs)


class ExpertStore(Protocol):
  """Where `train_experts_resumable` keeps groups: finished ones and each epoch (resume.py)."""

  def finished(self, kind: str, start: int, size: int) -> bool: ...

  def epochs_done(self, kind: str, start: int, size: int) -> list: ...

  def save_epoch(self, kind: str, start: int, epoch: int, params: Any) -> None: ...

  def finish(self, kind: str, start: int, trajectory: Any) -> None: ...

  def final_params(self, kind: str) -> Any: ...


def train_experts_resumable(
  kind: str,
  expert_config: ml_collections.ConfigDict,
  apply_fn,
  dsa_config: ml_collections.ConfigDict,
  init_params: Any,
  anchors: Any,
  rng: jax.Array,
  data: dict,
  store: ExpertStore,
  *,
  concurrency: int = 0,
  on_group_done: Callable[[int, int], None] | None = None,
  mesh: Any = None,
  should_stop: Callable[[], bool] | None = None,
) -> None:
  """`train_experts`, one jitted epoch at a time: each epoch of each group goes to `store`.

  Groups the store has finished are skipped; a group it holds epochs of
  continues after the last one. Every epoch's keys are those `make_trainer`
  splits from expert i's key (by index, never from a consumed stream), and a
  group is always the same experts, so a resumed run equals an uninterrupted
  one bit for bit (both run this same per-epoch program). The trajectories
  [size, epochs + 1, ...] go to `store.finish`, not back to the caller.
  With a `mesh` of several devices, each group's expert axis is split over it
  (sharding.py); on one device the program is the same as without. `should_stop()` is
  asked before each epoch: if True, Preempted is raised (the epochs so far are saved).
  """
  epoch_fn = jax.jit(
    jax.vmap(
      make_epoch_trainer(kind, expert_config, apply_fn, dsa_config),
      in_axes=(0, 0, 0, None, None, None),
    )
  )
  num_experts = jax.tree_util.tree_leaves(init_params)[0].shape[0]
  epochs = expert_config.epochs
  rng, family_rng = jax.random.split(rng)
  epoch_rngs = jax.vmap(lambda r: jax.random.split(r, epochs))(jax.random.split(rng, num_experts))
  family_rngs = jax.random.split(family_rng, epochs)
  group = expert_config.get("group_size", 0) or num_experts
  take = lambda tree, s: jax.tree_util.tree_map(lambda x: x[s : s + group], tree)
  starts = [s for s in range(0, num_experts, group)]
  sizes = {s: min(group, num_experts - s) for s in starts}
  todo = [s for s in starts if not store.finished(kind, s, sizes[s])]
  data = sharding.put_replicated(data, mesh)

  def inputs(s, params, e):
    """One epoch's arguments: the expert axis split over the mesh, the rest replicated."""
    split = (params, take(anchors, s), epoch_rngs[s : s + group, e])
    shared = (family_rngs[e], jnp.int32(e))
    split = sharding.put_leading(sharding.pad_leading(split, mesh), mesh)
    return (*split, *sharding.put_replicated(shared, mesh), data)

  compiled = {}  # Compiled before the threads start, once per group size.
  for s in todo:
    if sizes[s] not in compiled:
      args = inputs(s, take(init_params, s), 0)
      compiled[sizes[s]] = epoch_fn.lower(*args).compile()

  def run_group(s):
    done = store.epochs_done(kind, s, sizes[s])
    params = done[-1] if done else take(init_params, s)
    for e in range(len(done), epochs):
      if should_stop is not None and should_stop():
        raise Preempted(f"at epoch {e} of {epochs} ({kind} experts {s + 1}-{s + sizes[s]})")
      out = compiled[sizes[s]](*inputs(s, params, e))
      params = sharding.unpad(sharding.to_host(out), sizes[s])
      store.save_epoch(kind, s, e + 1, params)
      done.append(params)
    init = jax.device_get(take(init_params, s))
    store.finish(kind, s, jax.tree_util.tree_map(lambda *xs: np.stack(xs, 1), init, *done))

  parallel.run_concurrently(
    run_group, [(s,) for s in todo], parallel.resolve_concurrency(concurrency), on_group_done
  )


def train_kinds_resumable(
  expert_config: ml_collections.ConfigDict,
  apply_fn,
  dsa_config: ml_collections.ConfigDict,
  init_params: Any,
  rng: jax.Array,
  data: dict,
  store: Any,
  concurrency: int = 0,
  on_group_done: Callable[[str, int, int], None] | None = None,
  mesh: Any = None,
  kinds: tuple = KINDS,
  should_stop: Callable[[], bool] | None = None,
) -> None:
  """Trains each of `kinds` (default KINDS) in turn into `store`; theta0 of eq. 4 =
  `store.final_params("clean")`.

  Expert i of every kind starts from `init_params[i]`; theta0 for the watermarked and
  fp-enhanced expert i is the final state of clean expert i. A kind's PRNG stream is
  its place in KINDS, whichever `kinds` are trained. `should_stop`: train_experts_resumable.
  """
  if kinds[0] != "clean" or not set(kinds) <= set(KINDS):
    raise ValueError(f"kinds {kinds} must start with 'clean' and be some of {KINDS}")
  anchors = init_params  # Unused by clean experts.
  for i, kind in enumerate(KINDS):
    if kind not in kinds:
      continue
    progress = None if on_group_done is None else functools.partial(on_group_done, kind)
    train_experts_resumable(
      kind,
      expert_config,
      apply_fn,
      dsa_config,
      init_params,
      anchors,
      jax.random.fold_in(rng, i),
      data,
      store,
      concurrency=concurrency,
      on_group_done=progress,
      mesh=mesh,
      should_stop=should_stop,
    )
    if kind == "clean":
      anchors = store.final_params("clean")
