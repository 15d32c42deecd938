"""The "clean_label" embedding: the clean distilled set, each image moved within an l_inf ball.

No image is stamped and every label stays: image k becomes x0_k + delta_k with
|delta_k| <= eps per pixel (pixel scale [0, 1]), crafted so that a network
trained on the whole set *by the evaluation's own recipe* answers the key's
key-derived queries (key_queries.py, the "craft" draws) with the key's labels
y_i. Each crafting step differentiates through an entire evaluation training
(a fresh network, DSA, SGD with momentum, the set's learned lr, `craft_epochs`
epochs), because evaluation trains from scratch for hundreds of epochs and
short unrolls from expert checkpoints did not implant the watermark
(docs/notebook/2026-12-05-stealth-prototypes.md). The objective is

    CE(theta_T(queries), y_i) + craft_clean_weight * CE(theta_T(real batch), labels),

theta_T the trained network; the second term keeps Acc. The update is
Adam on the sign of the gradient, projected back into the ball.

Random streams (from the key the caller passes): iteration t uses
fold_in(key, t), split into (the fresh network's initialisation, its batches,
its DSA families, the real batch), so a resumed run repeats the same draws.
"""

from collections.abc import Callable
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ccdd_jax import CCDDError
from ccdd_jax import Preempted
from ccdd_jax import streams
from ccdd_jax.method import evaluate
from ccdd_jax.method import inner_loop

HISTORY_COLUMNS = 2  # Per iteration: the query CE and the clean CE.


def make_objective(
  apply_fn: Callable,
  dsa_config: ml_collections.ConfigDict,
  eval_config: ml_collections.ConfigDict,
  distill_config: ml_collections.ConfigDict,
) -> Callable:
  """`objective(delta, x0, labels, lr, init, rng, queries, query_labels, real_x, real_y)` ->
  (loss, (query CE, clean CE)): one evaluation training on x0 + delta, then both CEs."""
  d = distill_config
  trainer = evaluate.make_set_trainer(
    apply_fn,
    dsa_config,
    epochs=d.craft_epochs or eval_config.epochs,
    batch_size=eval_config.batch_size,
    momentum=eval_config.momentum,
    weight_decay=eval_config.weight_decay,
    remat=d.remat,  # The unrolled training's backward pass: what it stores per step.
  )

  def objective(delta, x0, labels, lr, init, rng, queries, query_labels, real_x, real_y):
    rng_batches, rng_family, rng_real = jax.random.split(rng, 3)
    params = trainer(init, x0 + delta, labels, lr, rng_batches, rng_family)
    query = inner_loop.cross_entropy(apply_fn(params, queries), query_labels)
    idx = jax.random.randint(rng_real, (d.craft_clean_batch,), 0, real_y.shape[0])
    clean = inner_loop.cross_entropy(apply_fn(params, real_x[idx]), real_y[idx])
    return query + d.craft_clean_weight * clean, (query, clean)

  return objective


def make_step(objective: Callable, optimizer: optax.GradientTransformation, eps: Any) -> Callable:
  """`step(delta, opt_state, init, rng, *data) -> (delta, opt_state, (query CE, clean CE))`:
  signed Adam on the objective, then delta clipped to [-eps, eps] (eps in input units)."""

  def step(delta, opt_state, init, rng, *data):
    args = (*data[:3], init, rng, *data[3:])  # objective's order: x0, labels, lr, init, rng, ...
    (_, terms), grad = jax.value_and_grad(objective, has_aux=True)(delta, *args)
    update, opt_state = optimizer.update(jnp.sign(grad), opt_state, delta)
    return jnp.clip(delta + update, -eps, eps), opt_state, terms

  return jax.jit(step)


def craft(
  distill_config: ml_collections.ConfigDict,
  objective: Callable | tuple[Callable, ...],
  init_fn: Callable[[jax.Array], Any] | tuple[Callable, ...],
  data: tuple,
  eps: np.ndarray,
  key: jax.Array,
  *,
  store: Any = None,
  progress: Callable[[int, tuple, float], None] | None = None,
  should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """The crafted images x0 + delta and the history [iterations, HISTORY_COLUMNS].

  `data` = (x0, labels, lr, queries, query_labels, real_x, real_y) as arrays;
  `init_fn(key)` a fresh network's parameters; tuples of objectives and init_fns (one per
  architecture, distill.craft_models) take turns, iteration t using entry t mod their
  number; `eps` the budget in input units
  (broadcast over the images). `store` (resume.DistillStore) saves the state
  every distill.checkpoint_every iterations, at the end, and where
  `should_stop()` (asked after each iteration but the last) stops the loop,
  which then raises `Preempted`; a rerun resumes from it.
  """
  d, x0 = distill_config, jnp.asarray(data[0])
  optimizer = optax.adam(d.craft_lr)
  objectives = objective if isinstance(objective, tuple) else (objective,)
  init_fns = init_fn if isinstance(init_fn, tuple) else (init_fn,)
  if len(objectives) != len(init_fns):
    raise ValueError(f"{len(objectives)} objectives for {len(init_fns)} init_fns")
  steps = [make_step(o, optimizer, jnp.asarray(eps, x0.dtype)) for o in objectives]
  delta = jnp.zeros_like(x0)
  state, history, bits = (delta, optimizer.init(delta)), [], streams.key_bits(key)
  like = {"state": state, "rng": bits}
  if store is not None and (saved := store.restore(like)) is not None:
    if not np.array_equal(saved["rng"], bits):
      raise CCDDError(f"the crafting checkpoint in {store.path} was made with another seed")
    state, history = saved["state"], list(np.asarray(saved["losses"]))
  start, every = time.time(), d.checkpoint_every
  for it in range(len(history), d.craft_iterations):
    k_init, k_step = jax.random.split(jax.random.fold_in(key, it))
    turn = it % len(steps)
    *state, terms = steps[turn](*state, init_fns[turn](k_init), k_step, *data)
    history.append(np.asarray(terms, np.float32))
    if progress is not None:
      progress(it, terms, time.time() - start)
    last = it + 1 == d.craft_iterations
    stop = not last and should_stop is not None and should_stop()
    if store is not None and (stop or last or (every and (it + 1) % every == 0)):
      store.save(it + 1, {"state": tuple(state), "losses": np.stack(history), "rng": bits})
    if stop:
      raise Preempted(f"at crafting iteration {it + 1} of {d.craft_iterations}")
  losses = np.stack(history) if history else np.zeros((0, HISTORY_COLUMNS), np.float32)
  return np.asarray(x0 + state[0]), losses
