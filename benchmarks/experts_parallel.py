r"""Expert training throughput: vmapped groups of experts, run one or several at a time.

  python benchmarks/experts_parallel.py                      # configs/digits.py experts
  python benchmarks/experts_parallel.py --kinds clean,watermarked,fp_enhanced --experts 8

Every path runs the same `experts.make_trainer` program under `jax.jit(jax.vmap(...))`,
as `experts.train_experts` does, over a leading axis of `experts.group_size`
experts, and `parallel.run_concurrently` runs `concurrency` (config) such
programs at once on a thread pool: "one at a time" (groups of 1, one program
at a time), "vmapped" (all K in one program), "N at once" (groups of 1, N
programs at once, N = the CPU cores) and both combined. Prints compile
seconds and experts / second for each, the throughput ratio to one at a time
(issue 4 asks >= 1.5x on CPU), and the largest parameter difference from
one at a time (0 where only the concurrency differs). Inputs are the digits
images scaled to [0, 1] and a fixed (public) watermark key: timing does not
depend on their values.
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ccdd_jax.config import loader as config_loader
from ccdd_jax.data import datasets as data_lib
from ccdd_jax.devices import parallel
from ccdd_jax.method import experts
from ccdd_jax.method import models
from ccdd_jax.method import watermark


def expert_inputs(config) -> tuple[dict, int, tuple]:
  """The trainer's `data` dict for the digits set, its class count and image shape."""
  ds = data_lib.load_dataset(config.data)
  side, channels = ds.image_shape[0], ds.image_shape[-1]
  patterns, labels = watermark.expand_key(
    bytes(range(32)),
    config.watermark.n_patterns,
    config.watermark.patch_size or side // 2,
    channels,
    ds.num_classes,
  )
  rng = np.random.default_rng(0)
  wm_images, wm_labels, _ = watermark.make_watermark_set(
    ds.train_images, ds.train_labels, patterns, labels, config.watermark.ratio, rng
  )
  scale = lambda x: jnp.asarray(x, jnp.float32) / 255.0
  prune = rng.choice(
    len(ds.train_labels), min(config.experts.prune_examples, len(ds.train_labels)), replace=False
  )
  data = {
    "train_images": scale(ds.train_images),
    "train_labels": jnp.asarray(ds.train_labels, jnp.int32),
    "wm_images": scale(wm_images),
    "wm_labels": jnp.asarray(wm_labels, jnp.int32),
    "prune_images": scale(ds.train_images[prune]),
  }
  return data, ds.num_classes, ds.image_shape


def parse_args() -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--kinds",
    default="watermarked",
    help="comma-separated expert kinds (clean, watermarked, fp_enhanced)",
  )
  parser.add_argument("--experts", type=int, default=0, help="K; 0 = experts.num_experts")
  parser.add_argument("--epochs", type=int, default=0, help="0 = experts.epochs")
  parser.add_argument("--conv", default="", help="model.conv_impl; '' = the config's")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path")
  return parser.parse_args()


def print_host() -> None:
  """Prints the JAX version and backend, the host's CPUs and its load average."""
  load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
  print(
    f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
    f"host {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
    f"load average {load}"
  )


def print_setup(config, k: int, data: dict) -> None:
  """Prints the experts' settings: K, epochs, images, batches, network and DSA."""
  expert_config = config.experts
  print(
    f"digits experts: K = {k}, {expert_config.epochs} epochs of "
    f"{len(data['train_labels'])} images (batch {expert_config.batch_size}, D_W batch "
    f"{expert_config.wm_batch_size}), ConvNet width {config.model.width} depth "
    f"{config.model.depth}, conv_impl {models.resolve_conv_impl(config.model.conv_impl)}, "
    f"DSA {config.dsa.strategy!r}"
  )


def print_legend(repeats: int) -> None:
  """Prints what the columns mean and the table's header."""
  print(
    f"run s: median wall time of {repeats} runs, K experts each; speed-up: "
    f"experts / s over one at a time's; cpu s: process CPU time (all threads), less "
    f"sensitive to other load; max |diff|: largest parameter difference from one at a time"
  )
  print(
    f"{'kind':12} {'path':24} {'compile s':>10} {'run s':>8} {'experts / s':>12} "
    f"{'speed-up':>9} {'cpu s':>8} {'cpu speed-up':>13} {'max |diff|':>11}"
  )


def compile_paths(train, paths: dict, start_params: tuple, family_rng, data) -> tuple[dict, dict]:
  """Compiles the program of each group size once: (size -> program, path -> compile s)."""
  init, anchors, rngs = start_params
  compiled, compile_s = {}, {}
  for path, (size, _) in paths.items():
    start = time.perf_counter()
    if size not in compiled:
      compiled[size] = train.lower(
        part(init, 0, size), part(anchors, 0, size), part(rngs, 0, size), family_rng, data
      ).compile()
    compile_s[path] = time.perf_counter() - start
  return compiled, compile_s


def time_paths(compiled, paths, k, repeats, start_params, family_rng, data) -> tuple:
  """Runs every path `repeats` times: (path -> wall s list, cpu s list, last parameters)."""
  init, anchors, rngs = start_params
  params = {}
  run_s, cpu_s = {p: [] for p in paths}, {p: [] for p in paths}
  for _ in range(repeats):  # Interleaved, so that load drifts hit every path.
    for path, (size, at_once) in paths.items():
      inputs = [
        (part(init, i, size), part(anchors, i, size), part(rngs, i, size), family_rng, data)
        for i in range(0, k, size)
      ]
      start, cpu_start = time.perf_counter(), time.process_time()
      outs = parallel.run_concurrently(compiled[size], inputs, at_once)
      run_s[path].append(time.perf_counter() - start)
      cpu_s[path].append(time.process_time() - cpu_start)
      params[path] = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *jax.device_get(outs))
  return run_s, cpu_s, params


def print_rows(kind: str, k: int, compile_s: dict, run_s: dict, cpu_s: dict, params: dict):
  """Prints one table row per path of one expert kind."""
  median = {p: statistics.median(t) for p, t in run_s.items()}
  cpu = {p: statistics.median(t) for p, t in cpu_s.items()}
  base = "one at a time"
  for path in compile_s:
    diff = max(
      jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), params[path], params[base])
      )
    )
    print(
      f"{kind:12} {path:24} {compile_s[path]:10.2f} {median[path]:8.2f} "
      f"{k / median[path]:12.2f} {median[base] / median[path]:9.2f} "
      f"{cpu[path]:8.2f} {cpu[base] / cpu[path]:13.2f} {diff:11.2g}",
      flush=True,
    )


def main():
  """Times the four paths for each expert kind and prints a table row for each."""
  args = parse_args()
  config = config_loader.load("digits")
  expert_config = config.experts
  if args.epochs:
    expert_config.epochs = args.epochs
  if args.conv:
    config.model.conv_impl = args.conv
  k = args.experts or expert_config.num_experts
  print_host()
  data, num_classes, image_shape = expert_inputs(config)
  network = models.build_network(config.model.name, num_classes, image_shape, config.model)
  print_setup(config, k, data)
  init = network.init_params(jax.random.PRNGKey(0), k)
  anchors = jax.tree_util.tree_map(lambda p: p + 0.01, init)
  start_params = (init, anchors, jax.random.split(jax.random.PRNGKey(1), k))
  family_rng = jax.random.PRNGKey(2)
  print_legend(args.repeats)
  for kind in args.kinds.split(","):
    trainer = experts.make_trainer(kind, expert_config, network.apply, config.dsa)
    train = jax.jit(jax.vmap(trainer, in_axes=(0, 0, 0, None, None)))
    workers = parallel.resolve_concurrency(0)
    # name -> (experts per vmapped program, programs at once)
    paths = {
      "one at a time": (1, 1),
      f"vmapped (K = {k})": (k, 1),
      f"{workers} at once": (1, workers),
      f"vmapped {k // workers}, {workers} at once": (max(1, k // workers), workers),
    }
    compiled, compile_s = compile_paths(train, paths, start_params, family_rng, data)
    run_s, cpu_s, params = time_paths(
      compiled, paths, k, args.repeats, start_params, family_rng, data
    )
    print_rows(kind, k, compile_s, run_s, cpu_s, params)


def part(tree, start: int, size: int):
  """Experts start .. start + size - 1 of a stacked pytree."""
  return jax.tree_util.tree_map(lambda x: x[start : start + size], tree)


if __name__ == "__main__":
  main()
