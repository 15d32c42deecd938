"""Which part of the expert trajectories each distillation iteration matches.

Trajectories are flat parameter vectors [E, T, P] per expert kind, kept on the
host: numpy arrays in memory, or any object with `shape` and `[e, t]` indexing
that reads one vector at a time (run/trajectory_store.py's file-backed store,
`distill.trajectory_store`). Every iteration's (expert, start epoch) is drawn
from its own key (`make_pair_sampler`), so a resumed run draws the same;
`select_pair` cuts the (start, target) vectors of the expert and its
fine-pruning-enhanced twin (or of a clean expert of the pool), and
`pair_feeder` sends only those to the devices. With `distill.pairs_per_iteration`
= k > 1 an iteration matches k pairs, drawn from `pair_keys(key, k)`, stacked on
a leading pair axis (split over the devices where `pairs_split` says so).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccdd_jax import streams
from ccdd_jax.devices import sharding

# Where distillation keeps the trajectories (distill.trajectory_store, run/trajectory_store.py):
# "memory" (numpy), "file" (a flat .npy per kind, read one vector at a time), "auto" (a file
# when they would take more than half of the host's memory).
TRAJECTORY_STORES = ("auto", "memory", "file")


def trajectory_epochs(distill_config: ml_collections.ConfigDict) -> int:
  """Epochs of each expert's trajectory that distillation reads: 0 .. max_start_epoch + M."""
  return distill_config.max_start_epoch + distill_config.expert_epochs + 1


def make_pair_sampler(distill_config: ml_collections.ConfigDict, num_experts: int, num_clean: int):
  """Returns `sample(rng) -> {"e", "t"[, "use_clean", "c"]}`: iteration `rng`'s expert and epoch.

  The indices of make_distill_update's iteration with key `rng`: expert e,
  start epoch t and, with a clean pool (`num_clean` > 0 and
  distill.clean_expert_fraction), whether clean expert c replaces e.
  """
  max_start, clean_fraction = distill_config.max_start_epoch, distill_config.clean_expert_fraction

  def sample(rng):
    rng_e, rng_t, _ = jax.random.split(rng, 3)
    out = {
      "e": jax.random.randint(rng_e, (), 0, num_experts),
      "t": jax.random.randint(rng_t, (), 0, max_start + 1),
    }
    if num_clean and clean_fraction:  # The paper's pool of both kinds.
      rng_pool = jax.random.fold_in(rng, streams.CLEAN_POOL)
      out["use_clean"] = jax.random.uniform(rng_pool) < clean_fraction
      out["c"] = jax.random.randint(jax.random.fold_in(rng_pool, 1), (), 0, num_clean)
    return out

  return sample


def pair_keys(rng: jax.Array, pairs: int) -> jax.Array:
  """The keys of an iteration's pairs: its key itself for one pair, else split(key, pairs)."""
  return rng if pairs == 1 else jax.random.split(rng, pairs)


def pairs_split(pairs: int, mesh: Any) -> bool:
  """Whether an iteration's pair axis is split over the mesh (a multiple of its devices, > 1)."""
  return pairs > 1 and sharding.size(mesh) > 1 and pairs % sharding.size(mesh) == 0


def select_pair(trajectories: tuple, index: dict, expert_epochs: int, xp=np) -> dict:
  """The (start, target) pairs one iteration matches: the expert's (or clean one's) and twin's.

  `trajectories` = (expert, twin[, clean]) flat parameters [E, T, P]; `index`
  one `make_pair_sampler` draw. `xp` = np on the host (host-resident
  trajectories, distill), jnp inside jit (make_distill_update). "beta_weight"
  (0 for a clean expert of the pool) is there only with a pool.
  """
  expert, twin = trajectories[:2]
  e, t, m = index["e"], index["t"], expert_epochs
  pair = {
    "start": expert[e, t],
    "target": expert[e, t + m],
    "twin_start": twin[e, t],
    "twin_target": twin[e, t + m],
  }
  if "use_clean" in index:
    clean, c, use = trajectories[2], index["c"], index["use_clean"]
    pair["start"] = xp.where(use, clean[c, t], pair["start"])
    pair["target"] = xp.where(use, clean[c, t + m], pair["target"])
    pair["beta_weight"] = xp.where(use, 0.0, 1.0).astype(np.float32)
  return pair


def draw_pairs(distill_config: ml_collections.ConfigDict, trajectories: tuple, rng) -> dict:
  """Inside jit, from whole trajectories on the device: the pairs of the iteration with key
  `rng` (with distill.pairs_per_iteration = k > 1 stacked on a leading axis of k)."""
  num_clean = trajectories[2].shape[0] if len(trajectories) > 2 else 0
  sample = make_pair_sampler(distill_config, trajectories[0].shape[0], num_clean)
  draw = lambda key: select_pair(trajectories, sample(key), distill_config.expert_epochs, jnp)
  pairs = distill_config.get("pairs_per_iteration", 1)
  return draw(rng) if pairs == 1 else jax.vmap(draw)(pair_keys(rng, pairs))


def mean_over_pairs(pair_fn: Callable, pairs: int, batched: bool = True) -> Callable:
  """`pair_fn(state, pair, rng, aux)` itself for one pair; for k, mapped over the pair axis
  (keys pair_keys(rng, k)) and every output averaged over it: the meta-gradient of the mean.

  `batched`: jax.vmap (one batched program: what accelerators and a pair axis split over
  devices want), else lax.map (the pairs one after another: XLA:CPU runs a vmapped pair
  2.7x slower than one alone, docs/scaling.md). The same values up to float rounding.
  """
  if pairs == 1:
    return pair_fn

  def mean(state, pair, rng, aux):
    keys = pair_keys(rng, pairs)
    if batched:
      per_pair = jax.vmap(pair_fn, in_axes=(None, 0, 0, None))(state, pair, keys, aux)
    else:
      per_pair = jax.lax.map(lambda p_k: pair_fn(state, *p_k, aux), (pair, keys))
    return jax.tree_util.tree_map(lambda x: jnp.mean(x, axis=0), per_pair)

  return mean


def pair_feeder(distill_config, trajectories: tuple, rngs: jax.Array, mesh: Any) -> Callable:
  """`pair_at(iteration)`: that iteration's (start, target) pairs, sent to the devices.

  The trajectories stay on the host; every iteration's (expert, epoch) is drawn
  up front from its key (make_pair_sampler), so only 4 flat vectors per pair
  move. With k = distill.pairs_per_iteration > 1 every leaf gets a leading
  axis of k pairs (pair_keys), split over the mesh where pairs_split says so.
  """
  trajectories = tuple(_on_host(t) for t in trajectories)
  num_clean = trajectories[2].shape[0] if len(trajectories) > 2 else 0
  sampler = make_pair_sampler(distill_config, trajectories[0].shape[0], num_clean)
  pairs = distill_config.get("pairs_per_iteration", 1)
  if pairs > 1:
    sampler = jax.vmap(sampler)
  draw = lambda rng: sampler(pair_keys(rng, pairs))
  plan = jax.device_get(jax.jit(jax.vmap(draw))(rngs))  # Every iteration's indices.
  m = distill_config.expert_epochs
  put = (
    (lambda tree: sharding.put_leading(tree, mesh))
    if pairs_split(pairs, mesh)
    else (lambda tree: sharding.to_device(tree, mesh))
  )

  def pair_at(it):
    if pairs == 1:
      return put(select_pair(trajectories, {k: v[it] for k, v in plan.items()}, m))
    each = [
      select_pair(trajectories, {k: v[it, p] for k, v in plan.items()}, m) for p in range(pairs)
    ]
    return put(jax.tree_util.tree_map(lambda *x: np.stack(x), *each))

  return pair_at


def _on_host(trajectories: Any) -> Any:
  """Device arrays fetched to numpy; numpy and lazy (file-backed) stores as they are."""
  return np.asarray(trajectories) if isinstance(trajectories, (jax.Array, list)) else trajectories
