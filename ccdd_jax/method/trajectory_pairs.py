"""Which part of the expert trajectories each distillation iteration matches.

Trajectories are flat parameter vectors [E, T, P] per expert kind, kept on the
host. Every iteration's (expert, start epoch) is drawn from its own key
(`make_pair_sampler`), so a resumed run draws the same; `select_pair` cuts
the (start, target) vectors of the expert and its fine-pruning-enhanced twin
(or of a clean expert of the pool), and `pair_feeder` sends only those to the
devices.
"""

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from ccdd_jax import streams
from ccdd_jax.devices import sharding


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


def pair_feeder(distill_config, trajectories: tuple, rngs: jax.Array, mesh: Any) -> Callable:
  """`pair_at(iteration)`: that iteration's (start, target) pairs, sent to the devices.

  The trajectories stay on the host; every iteration's (expert, epoch) is drawn
  up front from its key (make_pair_sampler), so only 4 flat vectors move.
  """
  trajectories = tuple(np.asarray(t) for t in trajectories)  # Host-resident.
  num_clean = trajectories[2].shape[0] if len(trajectories) > 2 else 0
  sampler = make_pair_sampler(distill_config, trajectories[0].shape[0], num_clean)
  plan = jax.device_get(jax.jit(jax.vmap(sampler))(rngs))  # Every iteration's indices.
  m = distill_config.expert_epochs
  return lambda it: sharding.to_device(
    select_pair(trajectories, {k: v[it] for k, v in plan.items()}, m), mesh
  )
