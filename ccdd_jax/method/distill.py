"""Stage II: distillation by matching expert trajectories (eq. 9, 10).

Each iteration samples a watermarked expert e and a start epoch t, runs N SGD
steps of a student from theta*_t on augmented minibatches of the synthetic
set (eq. 9, inside `lax.scan`), and updates the synthetic images and the
learnable step size alpha by differentiating eq. 10 through all N steps:

  L = ||th_{t+N} - th*_{t+M}||^2 / ||th*_t - th*_{t+M}||^2
      + beta * ||th_{t+N} - th^Idx_{t+M}||^2 / ||th^Idx_t - th^Idx_{t+M}||^2

where Idx is the fine-pruning-enhanced twin of expert e (same initial
parameters). Parameters are flat vectors (`ravel_pytree`) in the inner loop.

Levers beyond the paper (config fields of `distill`; with all of them off, the above):
  eq10_form             (a) "literal" as above; (b) "second_student": a second
                        student from th^Idx_t runs its own N steps on the same
                        minibatches and the beta term is ITS normalised distance
                        to th^Idx_{t+M}; (c) "student_normalised": the literal
                        numerator over ||th*_t - th^Idx_{t+M}||^2.
  clean_expert_fraction an iteration matches a clean expert with this
                        probability (its beta term off): the paper's pool.
  split_roles           with the pool, the trigger slots are updated only on
                        watermarked iterations, the other images only on clean
                        ones (and gamma_wm applies on watermarked ones only).
  carriers_per_pattern  k stamped carriers per pattern beyond the IPC images
                        (carrier_source: training images, or the set's own).
  freeze_trigger, trigger_safe_dsa  the stamped corner of trigger slots is
                        never updated / is kept out of DSA in eq. 9.
  gamma_wm, gamma_clean a direct objective after the N steps: gamma_wm *
                        CE(th_N(D_W batch), y_i) + gamma_clean * CE(th_N(clean batch)).
  soft_labels           learned label logits (TESLA / DATM), from one-hot or from
                        an expert's logits; the students train on their softmax.

These apply to the "matching" embedding (the paper's). The "appended" one
(the default, embedding.py) distils only a clean set, over clean experts,
and appends stamped carriers that are never distilled.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ccdd_jax import CCDDError
from ccdd_jax import Preempted
from ccdd_jax import streams
from ccdd_jax.devices import sharding
from ccdd_jax.method import augment
from ccdd_jax.method import inner_loop
from ccdd_jax.method import trajectory_pairs

# The forms of eq. 10 (distill.eq10_form): the paper's first.
EQ10_FORMS = ("literal", "second_student", "student_normalised")


class Aux(NamedTuple):
  """What a set's levers add to each update (embedding.aux_inputs); None = that lever is off."""

  trigger_mask: Any = None  # [S, H, W, 1]: 1 on trigger slots' stamped corner, kept out of DSA.
  grad_mask: Any = None  # [S, H, W, 1]: 0 on pixels never updated (freeze_trigger).
  trigger_slots: Any = None  # [S, 1, 1, 1]: split_roles' slots, updated on watermarked pairs.
  wm_images: Any = None  # The direct objective's D_W of the training split ...
  wm_labels: Any = None  # ... and its labels y_i.
  clean_images: Any = None  # The direct objective's clean training images ...
  clean_labels: Any = None  # ... and their labels.
  beta_weight: Any = None  # Set per iteration: 0 when a clean expert of the pool is matched.


# Columns of the loss history: the total, eq. 10's expert and twin terms, the direct objective.
HISTORY_COLUMNS = 4


def normalized_distance(params, start, target) -> jax.Array:
  """||params - target||^2 / ||start - target||^2 on flat vectors (one term of eq. 10)."""
  return jnp.sum(jnp.square(params - target)) / jnp.sum(jnp.square(start - target))


def make_student(
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  syn_steps: int,
  unroll: int,
  remat: str,
  mesh: Any = None,
) -> Callable:
  """Returns eq. 9, `run(start, images, labels, lr, step_inputs, keep) -> th_N`: N SGD steps
  on DSA-augmented minibatches of the synthetic set, inside `lax.scan`.

  `step_inputs` = {"idx": [N, batch], "rng": [N] keys}; `keep` [S, H, W, 1]
  marks pixels kept out of DSA (or None). With a `mesh` each minibatch is
  split over its devices (sharding.constrain_batch).
  """
  split = lambda x: sharding.constrain_batch(x, mesh)  # Data parallel over the minibatch.

  def student_loss(flat_params, step_input, images, labels, keep):
    idx = step_input["idx"]
    batch = augment.augment_keeping(
      split(images[idx]),
      step_input["rng"],
      dsa_config,
      None if keep is None else split(jnp.asarray(keep)[idx]),
    )
    return inner_loop.cross_entropy(apply_flat(flat_params, split(batch)), split(labels[idx]))

  def run(start, images, labels, lr, step_inputs, keep):
    final, _, _ = inner_loop.sgd_scan(
      lambda w, s: student_loss(w, s, images, labels, keep),
      start,
      step_inputs,
      jnp.full((syn_steps,), lr),
      unroll=unroll,
      remat=remat,
    )
    return final

  return run


def make_meta_loss(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  num_syn: int,
  unroll: int | str = 1,
  remat: str = "none",
  with_terms: bool = False,
  mesh: Any = None,
):
  """Returns `loss(images, lr, labels, start, target, twin_start, twin_target, rng, aux=None)`.

  eq. 10 in the form `distill_config.eq10_form` names (module docstring), plus
  the direct objective where gamma_wm / gamma_clean > 0. `aux` (an `Aux`)
  gives what the levers need: `trigger_mask` (with distill.trigger_safe_dsa),
  `beta_weight` and the direct objective's pools. `unroll` (see inner_loop.resolve_unroll)
  and `remat` (one of inner_loop.REMAT_POLICIES) set the speed and memory of
  the inner loop only. With `with_terms` it returns (loss, (expert term, twin
  term, direct term)). With a `mesh` of several devices each student step's
  synthetic minibatch is split over the devices (data parallel, parameters
  replicated: sharding.constrain_batch); the algorithm is the same.
  """
  syn_steps = distill_config.syn_steps
  batch_syn = min(distill_config.batch_syn or num_syn, num_syn)
  beta, form = distill_config.beta, distill_config.eq10_form
  if form not in EQ10_FORMS:
    raise ValueError(f"unknown eq10_form {form!r}: use one of {', '.join(EQ10_FORMS)}")
  gamma_wm, gamma_clean = distill_config.gamma_wm, distill_config.gamma_clean
  objective_batch = distill_config.objective_batch
  unroll = inner_loop.resolve_unroll(unroll, syn_steps)
  run_student = make_student(apply_flat, dsa_config, syn_steps, unroll, remat, mesh)

  def pool_ce(params, rng, images, labels):
    idx = jax.random.randint(rng, (objective_batch,), 0, labels.shape[0])
    return inner_loop.cross_entropy(apply_flat(params, images[idx]), labels[idx])

  def meta_loss(images, lr, labels, start, target, twin_start, twin_target, rng, aux=None):
    aux = aux or Aux()
    beta_weight = 1.0 if aux.beta_weight is None else aux.beta_weight
    rng_idx, rng_aug = jax.random.split(rng)
    idx = jax.vmap(lambda r: jax.random.permutation(r, num_syn)[:batch_syn])(
      jax.random.split(rng_idx, syn_steps)
    )
    step_inputs = {"idx": idx, "rng": jax.random.split(rng_aug, syn_steps)}
    keep = aux.trigger_mask if distill_config.trigger_safe_dsa else None
    final = run_student(start, images, labels, lr, step_inputs, keep)
    expert_term = normalized_distance(final, start, target)
    if not beta:
      twin_term = jnp.zeros_like(expert_term)
    elif form == "second_student":  # (b): each student against its own expert.
      twin_final = run_student(twin_start, images, labels, lr, step_inputs, keep)
      twin_term = normalized_distance(twin_final, twin_start, twin_target)
    elif form == "student_normalised":  # (c)
      twin_term = normalized_distance(final, start, twin_target)
    else:  # (a), the paper's literal eq. 10.
      twin_term = normalized_distance(final, twin_start, twin_target)
    direct = jnp.zeros_like(expert_term)
    rng_wm, rng_clean = jax.random.split(jax.random.fold_in(rng, streams.DIRECT_OBJECTIVE))
    if gamma_wm:  # Beyond the paper: the watermark asked of th_N directly.
      # With split_roles only on watermarked iterations: the class images learn no trigger.
      weight = beta_weight if distill_config.get("split_roles") else 1.0
      direct += gamma_wm * weight * pool_ce(final, rng_wm, aux.wm_images, aux.wm_labels)
    if gamma_clean:
      direct += gamma_clean * pool_ce(final, rng_clean, aux.clean_images, aux.clean_labels)
    loss = expert_term + beta * beta_weight * twin_term + direct
    return (loss, (expert_term, twin_term, direct)) if with_terms else loss

  return meta_loss


def make_pair_update(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  num_syn: int,
  mesh: Any = None,
):
  """Returns the pure `update(state, pair, rng, aux=None) -> (state, [loss, terms])`.

  `pair` = select_pair's {"start", "target", "twin_start", "twin_target"[,
  "beta_weight"]}: the only part of the trajectories an iteration reads.
  `state` = {"images", "lr", "opt_state", "labels"[, "label_logits"]} (see
  init_state; with "label_logits" the students train on their softmax and
  the logits are learned too). `aux` is an `Aux`: make_meta_loss's fields,
  `grad_mask` (0 = a pixel never updated: the frozen stamped corner) and
  `trigger_slots` (distill.split_roles: 1 = a slot updated only when `pair`
  is a watermarked expert's, 0 = only when it is a clean one's, "beta_weight"
  0). The terms are (expert, twin, direct).
  `mesh`: make_meta_loss's (data parallel over the synthetic minibatch).
  With k = distill.pairs_per_iteration > 1, `pair`'s leaves lead with k pairs (pair_feeder):
  their losses and gradients (keys: trajectory_pairs.pair_keys) are averaged before one
  optimiser step (mean_over_pairs: vmapped, or in turn on XLA:CPU without a split); where
  pairs_split says so the pairs are spread over the mesh.
  """
  pairs = distill_config.get("pairs_per_iteration", 1)
  split = trajectory_pairs.pairs_split(pairs, mesh)
  if split:
    mesh = None  # The pair axis is split over the devices: each pair's students run whole.
  pair_grads = _make_pair_grads(distill_config, apply_flat, dsa_config, num_syn, mesh)
  batched = split or jax.default_backend() != "cpu"  # vmapped, else one pair after another.
  pair_grads = trajectory_pairs.mean_over_pairs(pair_grads, pairs, batched)  # Itself for 1.
  soft = bool(distill_config.get("soft_labels"))
  optimizer = make_optimizer(distill_config, soft)

  def update(state, pair, rng, aux=None):
    history, grad_tree = pair_grads(state, pair, rng, aux)
    trainable = {"images": state["images"], "lr": state["lr"]}
    if soft:
      trainable["label_logits"] = state["label_logits"]
    updates, opt_state = optimizer.update(grad_tree, state["opt_state"], trainable)
    trainable = optax.apply_updates(trainable, updates)
    # A negative step size would make the student climb the loss.
    new_state = {
      **trainable,
      "lr": jnp.maximum(trainable["lr"], 1e-6),
      "opt_state": opt_state,
      "labels": state["labels"],
    }
    return new_state, history

  return update


def _make_pair_grads(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  num_syn: int,
  mesh: Any,
):
  """`grads(state, pair, rng, aux) -> ([loss, terms], gradients)`: make_pair_update's, one pair."""
  args = (distill_config, apply_flat, dsa_config, num_syn, distill_config.unroll)
  meta_loss = make_meta_loss(*args, distill_config.remat, with_terms=True, mesh=mesh)
  soft = bool(distill_config.get("soft_labels"))

  def pair_grads(state, pair, rng, aux):
    """One pair's [loss, terms] and the (masked) gradients of what the optimiser updates."""
    aux = (aux or Aux())._replace(beta_weight=pair.get("beta_weight"))
    rng_loss = jax.random.split(rng, 3)[2]  # [0] and [1] drew the expert and the epoch.
    grad_mask, trigger_slots = aux.grad_mask, aux.trigger_slots
    aux = aux._replace(grad_mask=None, trigger_slots=None)  # Not the loss's inputs.
    loss_fn = (
      (lambda images, lr, logits, *rest: meta_loss(images, lr, jax.nn.softmax(logits), *rest))
      if soft
      else meta_loss
    )
    (loss, terms), grads = jax.value_and_grad(
      loss_fn, argnums=(0, 1, 2) if soft else (0, 1), has_aux=True
    )(
      state["images"],
      state["lr"],
      state["label_logits"] if soft else state["labels"],
      pair["start"],
      pair["target"],
      pair["twin_start"],
      pair["twin_target"],
      rng_loss,
      aux,
    )
    image_grads = grads[0] if grad_mask is None else grads[0] * grad_mask
    if trigger_slots is not None:  # split_roles: which slots this expert's kind updates.
      watermarked = pair.get("beta_weight", 1.0)
      image_grads *= watermarked * trigger_slots + (1.0 - watermarked) * (1.0 - trigger_slots)
    grad_tree = {"images": image_grads, "lr": grads[1]}
    if soft:
      # freeze_trigger keeps the trigger slots' labels too (rows whose corner is frozen).
      keep_rows = 1.0 if grad_mask is None else jnp.min(grad_mask, axis=(1, 2, 3))[:, None]
      grad_tree["label_logits"] = grads[2] * keep_rows
    return jnp.stack([loss, *terms]), grad_tree

  return pair_grads


def make_distill_update(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  num_syn: int,
  mesh: Any = None,
):
  """Returns the pure `update(state, trajectories, rng, aux=None) -> (state, [loss, terms])`.

  make_pair_update with the pair drawn inside (make_pair_sampler, select_pair)
  from whole `trajectories` = (expert [E, T, P], twin [E, T, P]) on the
  device, or (expert, twin, clean [E', T, P]): then each iteration matches a
  clean expert with probability distill.clean_expert_fraction (its beta term
  off). `distill` itself keeps the trajectories on the host and sends only
  the pair.
  """
  pair_update = make_pair_update(distill_config, apply_flat, dsa_config, num_syn, mesh)

  def update(state, trajectories, rng, aux=None):
    pair = trajectory_pairs.draw_pairs(distill_config, trajectories, rng)
    return pair_update(state, pair, rng, aux)

  return update


def make_distill_step(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  num_syn: int,
  mesh: Any = None,
):
  """The update of make_pair_update, jitted; the state it replaces is donated."""
  return jax.jit(
    make_pair_update(distill_config, apply_flat, dsa_config, num_syn, mesh), donate_argnums=(0,)
  )


def init_state(
  distill_config: ml_collections.ConfigDict,
  init_images: np.ndarray,
  labels: np.ndarray,
  label_logits: np.ndarray | None = None,
) -> dict:
  """The distillation state on the default device: images, alpha = lr_teacher, optimiser
  (and learned label logits [N, K] where `label_logits` gives their start)."""
  trainable = {
    "images": jax.device_put(np.asarray(init_images, np.float32)),
    "lr": jax.device_put(np.float32(distill_config.lr_teacher)),
  }
  if label_logits is not None:
    trainable["label_logits"] = jax.device_put(np.asarray(label_logits, np.float32))
  return {
    **trainable,
    "opt_state": make_optimizer(distill_config, label_logits is not None).init(trainable),
    "labels": jax.device_put(np.asarray(labels, np.int32)),
  }


def make_optimizer(
  distill_config: ml_collections.ConfigDict, soft_labels: bool = False
) -> optax.GradientTransformation:
  """SGD with momentum 0.5 on the images (lr_img) and on the step size (lr_lr), as MTT, and
  with `soft_labels` on the label logits (lr_label)."""
  transforms = {
    "images": optax.sgd(distill_config.lr_img, momentum=0.5),
    "lr": optax.sgd(distill_config.lr_lr, momentum=0.5),
  }
  if soft_labels:
    transforms["label_logits"] = optax.sgd(distill_config.lr_label, momentum=0.5)
  return optax.multi_transform(transforms, {name: name for name in transforms})


def distill(
  distill_config: ml_collections.ConfigDict,
  apply_flat: Callable,
  dsa_config: ml_collections.ConfigDict,
  init_images: np.ndarray,
  labels: np.ndarray,
  trajectories: tuple[Any, ...],
  rng: jax.Array,
  progress: Callable[[int, float], None] | None = None,
  aux: Aux | None = None,
  store: Any = None,
  mesh: Any = None,
  label_logits: np.ndarray | None = None,
  monitor: Callable[[int, jax.Array, dict], None] | None = None,
  should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray | None]:
  """Runs all distillation iterations; returns images, learned lr, history [it, 4], label logits.

  The history holds the total loss and its terms (eq. 10's expert and twin
  terms, the direct objective) per iteration. `aux`: see make_distill_update.
  With distill.soft_labels, `label_logits` [N, K] (initial_label_logits) are
  learned too and returned; with hard labels they are None.
  With a `store` (resume.DistillStore) the state is saved every
  `distill.checkpoint_every` iterations and at the end, and a saved state is
  resumed from; iteration i's key is the i-th split of `rng` whatever the start,
  so a resumed run is bitwise the uninterrupted one. A non-finite loss stops
  the run at the next check (each save, and the end): the last good state stays saved.

  The trajectories stay on the host (numpy): every iteration's (expert,
  epoch) is drawn up front from its key (make_pair_sampler), and only that
  iteration's pairs (select_pair: 4 flat parameter vectors) go to the device,
  put there while the previous iteration runs. With a `mesh` of several
  devices the state is replicated and each student step's minibatch split
  over the devices (make_meta_loss); the synthetic minibatch must split evenly.
  `monitor(it, history row, state)` sees device arrays; the next step donates `state`.
  `should_stop()`, asked after each iteration but the last: True saves there, raises Preempted.
  """
  num_syn = init_images.shape[0]
  _check_inputs(distill_config, trajectories, num_syn, label_logits, mesh)
  step = make_distill_step(distill_config, apply_flat, dsa_config, num_syn, mesh)
  state = init_state(distill_config, init_images, labels, label_logits)
  state = sharding.put_replicated(state, mesh)
  state, losses = _resumed(store, state, rng, mesh)
  start = len(losses)
  aux = sharding.to_device(jax.tree_util.tree_map(np.asarray, aux or Aux()), mesh)
  rngs = jax.random.split(rng, distill_config.iterations)
  pair_at = trajectory_pairs.pair_feeder(distill_config, trajectories, rngs, mesh)
  rngs = list(sharding.to_device(rngs, mesh))  # Device keys, sliced once.
  every, checked = distill_config.get("checkpoint_every", 0), start
  upcoming = pair_at(start) if start < len(rngs) else None
  for it in range(start, distill_config.iterations):
    pair = upcoming
    # Nothing crosses between host and device here: an accidental transfer
    # (a NumPy input, a Python scalar argument) is an error, not a slowdown.
    with jax.transfer_guard("disallow"):
      state, loss = step(state, pair, rngs[it], aux)
    if it + 1 < len(rngs):  # The next pair travels while this step runs (async dispatch).
      upcoming = pair_at(it + 1)
    losses.append(loss)
    if progress is not None:
      progress(it, loss[0])  # A device scalar: the callback decides when to fetch it.
    if monitor is not None:
      monitor(it, loss, state)  # It copies what it keeps and fetches in batches.
    stop = it + 1 < len(rngs) and should_stop is not None and should_stop()
    if store is not None and (stop or (every and (it + 1) % every == 0) or it + 1 == len(rngs)):
      _check_finite(losses, checked, store)
      store.save(it + 1, _saved(state, losses, rng))
      checked = it + 1
    if stop:
      raise Preempted(f"at iteration {it + 1} of {len(rngs)}")
  _check_finite(losses, checked, store)
  losses = np.asarray(sharding.to_host(losses), np.float64)
  learned_labels = sharding.to_host(state["label_logits"]) if label_logits is not None else None
  images, lr = sharding.to_host(state["images"]), float(sharding.to_host(state["lr"]))
  return images, lr, losses, learned_labels


def _check_inputs(distill_config, trajectories: tuple, num_syn: int, label_logits, mesh) -> None:
  """Enough stored epochs, label logits with soft labels, a minibatch the devices split."""
  needed = trajectory_pairs.trajectory_epochs(distill_config) - 1
  available = trajectories[0].shape[1] - 1
  if needed > available:
    raise CCDDError(
      f"distill.max_start_epoch + distill.expert_epochs = {needed} exceeds the "
      f"{available} expert epochs stored"
    )
  if bool(distill_config.get("soft_labels")) != (label_logits is not None):
    raise ValueError("label_logits go with distill.soft_labels (initial_label_logits)")
  batch = min(distill_config.batch_syn or num_syn, num_syn)
  if not trajectory_pairs.pairs_split(distill_config.get("pairs_per_iteration", 1), mesh):
    sharding.check_batch(batch, mesh, "the synthetic minibatch (distill.batch_syn, or all images)")


def _resumed(store: Any, state: dict, rng: jax.Array, mesh: Any) -> tuple[dict, list]:
  """The saved state and loss history where `store` holds one, else `state` and []."""
  if store is None or (saved := store.restore(_saved(state, [], rng))) is None:
    return state, []
  if not np.array_equal(saved["rng"], streams.key_bits(rng)):
    raise CCDDError(f"the distillation checkpoint in {store.path} was made with another seed")
  return sharding.to_device(saved["state"], mesh), list(saved["losses"])


def _saved(state: dict, losses: list, rng: jax.Array) -> dict:
  """What a distillation checkpoint holds: the state, eq. 10's history, the run's PRNG key."""
  return {
    "state": state,
    "losses": np.asarray(jax.device_get(losses), np.float32).reshape(-1, HISTORY_COLUMNS),
    "rng": streams.key_bits(rng),
  }


def _check_finite(losses: list, since: int, store: Any) -> None:
  """Raises a one-line CCDDError naming the first iteration >= `since` with a non-finite loss."""
  recent = np.asarray(jax.device_get(losses[since:]), np.float64).reshape(-1, HISTORY_COLUMNS)
  bad = np.flatnonzero(~np.all(np.isfinite(recent), axis=1))
  if len(bad):
    kept = f"; the state after iteration {since} is kept in {store.path}" if store and since else ""
    raise CCDDError(
      f"distillation diverged at iteration {since + bad[0] + 1} (non-finite matching loss)"
      f"{kept}: lower distill.lr_img or distill.lr_lr"
    )
