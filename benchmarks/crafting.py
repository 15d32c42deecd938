r"""One crafting step of the "clean_label" embedding per remat policy: memory, compile, time.

  python benchmarks/crafting.py                                   # digits_clean_label
  python benchmarks/crafting.py --config cifar10_cpu --remat none,full,nested --steps 2

A crafting step (method/crafting.py) differentiates through a whole evaluation training
(eval.epochs epochs of a fresh network, DSA, momentum), so what the backward pass stores
per training step decides whether it fits in memory at all. For each policy: XLA's planned
scratch memory (temp; what the backward pass stores lives there, exact and load-independent),
the compile time, and the median wall time of --steps steps with its ratio to the fastest.
A policy whose planned memory exceeds --max_gib is compiled but not run (--steps 0: none is).
The config's own fields (set size, image shape, network, epochs) are used; images and queries
are random, since the time and the memory do not depend on their values.
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import memory_probe
from ccdd_jax.config import loader as config_loader
from ccdd_jax.method import crafting
from ccdd_jax.method import inner_loop
from ccdd_jax.method import models

# The image shape of each data source the shipped configs use (the data are not loaded).
SHAPES = {"digits": (8, 8, 1), "folder": (32, 32, 3), "tinyimagenet": (64, 64, 3)}
CLEAN_LABEL_FIELDS = (
  "distill.watermark_embedding=clean_label",
  "watermark.queries=key_derived",
  "distill.triggers_per_pattern=0",
)


def image_shape(config) -> tuple:
  """The config's image shape (SHAPES, resized where data.image_size says)."""
  side, _, channels = SHAPES[config.data.name]
  side = config.data.image_size or side
  return (side, side, channels)


def problem(config, seed: int = 0) -> tuple:
  """(network, data) of one crafting step at the config's shapes: random images and queries."""
  shape = image_shape(config)
  net = models.build_network(config.model.name, 10, shape, config.model)
  rng = np.random.default_rng(seed)
  num = 10 * config.distill.ipc
  queries = config.watermark.n_patterns * config.distill.craft_queries
  images = lambda n: jnp.asarray(rng.standard_normal((n, *shape)), jnp.float32)
  labels = lambda n: jnp.asarray(rng.integers(0, 10, n), jnp.int32)
  real = max(config.distill.craft_clean_batch, 1)
  lr = jnp.float32(config.distill.lr_teacher)
  return net, (images(num), labels(num), lr, images(queries), labels(queries), images(real),
               labels(real))  # fmt: skip


def measure(config, remat: str, steps: int, max_gib: float) -> dict:
  """Compile time, planned memory and step times of one remat policy."""
  config.distill.remat = remat
  net, data = problem(config)
  objective = crafting.make_objective(net.apply, config.dsa, config.eval, config.distill)
  eps = jnp.float32(config.distill.craft_eps)
  step = crafting.make_step(objective, optax.adam(config.distill.craft_lr), eps)
  init = jax.tree_util.tree_map(lambda x: x[0], net.init_params(jax.random.PRNGKey(0), 1))
  delta = jnp.zeros_like(data[0])
  opt_state = optax.adam(config.distill.craft_lr).init(delta)
  args = (delta, opt_state, init, jax.random.PRNGKey(1), *data)
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  result = {"remat": remat, "compile_s": time.perf_counter() - start}
  result.update(memory_probe.xla_memory(compiled))
  temp_gib = result.get("temp_size_in_bytes", 0) / 2**30
  if temp_gib > max_gib:
    return {**result, "times": []}
  times = []
  for i in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args[:3], jax.random.PRNGKey(2 + i), *args[4:]))
    times.append(time.perf_counter() - start)
  return {**result, "times": times}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="digits_clean_label", help="a shipped config's name or file")
  p.add_argument("--remat", default="none,full,nested", help="policies (inner_loop.REMAT_POLICIES)")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--max_gib", type=float, default=12.0, help="run a policy only below this temp")
  p.add_argument("--set", action="append", default=[], help="field=value overrides")
  args = p.parse_args(argv)
  policies = [r for r in args.remat.split(",") if r]
  unknown = [r for r in policies if r not in inner_loop.REMAT_POLICIES]
  if unknown:
    p.error(f"unknown remat policies {unknown}: use {', '.join(inner_loop.REMAT_POLICIES)}")
  config = config_loader.load(args.config, [*CLEAN_LABEL_FIELDS, *args.set])
  d = config.distill
  side, _, channels = image_shape(config)
  print(
    f"{args.config}: {10 * d.ipc} images {side}x{side}x{channels}, "
    f"{config.model.name} width {config.model.width}, "
    f"{d.craft_epochs or config.eval.epochs} epochs x batch {config.eval.batch_size} per step"
  )
  load = " ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs "
        f"({platform.machine()}), load {load}")  # fmt: skip
  rows = [measure(config, remat, args.steps, args.max_gib) for remat in policies]
  fastest = min((statistics.median(r["times"]) for r in rows if r["times"]), default=None)
  print("| remat | temp GiB | compile s | median step s | x fastest |")
  print("|---|---|---|---|---|")
  for r in rows:
    temp = r.get("temp_size_in_bytes", 0) / 2**30
    if r["times"]:
      median = statistics.median(r["times"])
      timing = f"{median:.2f} | {median / fastest:.2f}"
    elif args.steps == 0:
      timing = "compiled only (--steps 0) | –"
    else:
      timing = f"not run (> {args.max_gib:g} GiB) | –"
    print(f"| {r['remat']} | {temp:.2f} | {r['compile_s']:.1f} | {timing} |")


if __name__ == "__main__":
  main()
