r"""Peak host memory of a distillation over trajectories larger than it may hold: memory vs file.

  python benchmarks/trajectory_memory.py --dir /tmp/trajectory_memory   # 3.3 GiB: the figures
  python benchmarks/trajectory_memory.py --dir D --experts 4 --iterations 2  # a quick look

Writes synthetic expert trajectories as the experts stage does (Orbax, checkpoints.save_trajectory,
one expert at a time): `--experts` experts x `--epochs` epochs of random parameters of the
Tiny ImageNet ConvNet-4 (width 128, 64x64x3, 200 classes: P = 857,160, as
configs/tinyimagenet_ipc50.py), then runs, each in its own subprocess (its own peak):

  build          trajectory_store.open_flat: the file store built from the checkpoints.
  memory         distill.distill over trajectory_store.load(..., "memory") (numpy in RAM).
  file           the same over the file store (one [P] vector per read, 4 per iteration).
  memory/file under --limit  both again under `prlimit --as` (an address-space limit) smaller
                 than the trajectories: the memory store cannot hold them, the file store runs.

The distillation is small (`--images` synthetic images, minibatch half of them, `--steps`
student steps, `--iterations` iterations): the figures are about the trajectories, not the
compute. Each child reports VmHWM (peak resident set, /proc/self/status; = ru_maxrss),
VmPeak (peak address space), its resident set before the trajectories are loaded and the
seconds per iteration (compilation apart: the first iteration is not timed). All children
share one persistent compilation cache.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from ccdd_jax.config import schema
from ccdd_jax.method import distill
from ccdd_jax.method import models
from ccdd_jax.run import checkpoints
from ccdd_jax.run import trajectory_store

SHAPE, CLASSES = (64, 64, 3), 200  # Tiny ImageNet.
KIND = "clean"


def network():
  """The Tiny ImageNet ConvNet-4 of configs/tinyimagenet_ipc50.py."""
  model = schema.section("model", depth=4)
  return models.build_network("convnet", CLASSES, SHAPE, model)


def status() -> dict:
  """VmRSS, VmHWM and VmPeak of this process in bytes."""
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key = line.split(":")[0]
      if key in ("VmRSS", "VmHWM", "VmPeak"):
        out[key] = 1024 * int(line.split()[1])
  return out


def write_experts(root: str, experts: int, epochs: int) -> None:
  """Random float32 parameters shaped like the network, saved one expert at a time."""
  like = network().like_params()
  rng = np.random.default_rng(0)
  for index in range(experts):
    if index in checkpoints.list_experts(root, KIND):
      continue
    stacked = jax.tree.map(
      lambda x: (0.05 * rng.standard_normal((epochs, *x.shape))).astype(np.float32), like
    )
    checkpoints.save_trajectory(root, KIND, index, stacked, overwrite=True)


def child(mode: str, root: str, args: argparse.Namespace) -> dict:
  """One measured run in this process: `build`, or a distillation over `memory` / `file`."""
  net, result = network(), {"mode": mode}
  result["rss_before_bytes"] = status()["VmRSS"]
  start = time.perf_counter()
  if mode == "build":
    trajectory_store.open_flat(root, KIND, net.like_params(), args.epochs)
    return {**result, "seconds": time.perf_counter() - start, **status()}
  loaded = trajectory_store.load(root, (KIND,), net.like_params(), args.epochs, mode)[KIND]
  result["load_seconds"] = time.perf_counter() - start
  result["rss_after_load_bytes"] = status()["VmRSS"]
  cfg = schema.section(
    "distill",
    iterations=args.iterations,
    syn_steps=args.steps,
    batch_syn=args.images // 2,
    expert_epochs=2,
    max_start_epoch=args.epochs - 3,
    beta=0.0,
    remat="full",
  )
  images = np.random.default_rng(1).standard_normal((args.images, *SHAPE)).astype(np.float32)
  labels = np.arange(args.images) % CLASSES
  times = []
  progress = lambda it, loss: times.append((it, time.perf_counter(), float(loss)))
  dsa = schema.section("dsa")
  distill.distill(
    cfg, net.apply_flat, dsa, images, labels, (loaded, loaded), jax.random.PRNGKey(0), progress
  )
  steps = np.diff([t for _, t, _ in times])
  result["seconds_per_iteration"] = float(np.mean(steps)) if len(steps) else None
  result["final_loss"] = times[-1][2]
  return {**result, **status()}


def run_child(mode: str, args: argparse.Namespace, limit: int | None, cache: str) -> dict:
  """`child(mode)` in a subprocess (under `prlimit --as=limit`): its JSON, or how it failed."""
  command = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
  if limit:
    command = ["prlimit", f"--as={limit}", *command]
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PLATFORMS": "cpu"}
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if done.returncode or not lines:
    last = (done.stderr.strip().splitlines() or ["?"])[-1]
    return {"mode": mode, "failed": f"exit {done.returncode}: {last[:160]}"}
  return json.loads(lines[-1])


def table(results: dict, nbytes: int) -> str:
  """The runs side by side."""
  gib = lambda b: "-" if b is None else f"{b / 2**30:.2f}"
  rows = [
    ("peak RSS (VmHWM), GiB", lambda r: gib(r.get("VmHWM"))),
    ("RSS before loading, GiB", lambda r: gib(r.get("rss_before_bytes"))),
    ("RSS after loading, GiB", lambda r: gib(r.get("rss_after_load_bytes"))),
    ("peak address space (VmPeak), GiB", lambda r: gib(r.get("VmPeak"))),
    ("load / build, s", lambda r: f"{r.get('load_seconds', r.get('seconds', 0)):.1f}"),
    ("s / iteration (after the first)", lambda r: f"{r.get('seconds_per_iteration') or 0:.2f}"),
    ("last eq. 10 loss", lambda r: f"{r['final_loss']:.7f}" if "final_loss" in r else "-"),
    ("outcome", lambda r: r.get("failed", "ran")),
  ]
  names = list(results)
  lines = [f"trajectories: {gib(nbytes)} GiB", "| | " + " | ".join(names) + " |"]
  lines.append("|---" * (len(names) + 1) + "|")
  for label, cell in rows:
    lines.append(f"| {label} | " + " | ".join(cell(results[n]) for n in names) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "trajectory_memory"))
  parser.add_argument("--experts", type=int, default=24)
  parser.add_argument("--epochs", type=int, default=43)  # max_start_epoch 40 + M 2 + 1.
  parser.add_argument("--images", type=int, default=20)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--iterations", type=int, default=6)
  parser.add_argument("--limit_gib", type=float, default=0.0, help="0: 0.8 x the trajectories")
  parser.add_argument("--child", default="")
  args = parser.parse_args()
  root = os.path.join(args.dir, "trajectories")
  if args.child:
    print(json.dumps(child(args.child, root, args)))
    return
  write_experts(root, args.experts, args.epochs)
  nbytes = trajectory_store.estimate_bytes(root, (KIND,), network().like_params(), args.epochs)
  limit = int(args.limit_gib * 2**30) or int(0.8 * nbytes)
  cache = os.path.join(args.dir, "jax_cache")
  results = {"build": run_child("build", args, None, cache)}
  for mode in ("memory", "file"):
    results[mode] = run_child(mode, args, None, cache)
  for mode in ("memory", "file"):
    results[f"{mode}, --as {limit / 2**30:.2f} GiB"] = run_child(mode, args, limit, cache)
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
  print(f"jax {jax.__version__}; P = {trajectory_store.num_params(network().like_params()):,}")
  print(table(results, nbytes))
  with open(os.path.join(args.dir, "results.json"), "w") as f:
    json.dump({"trajectory_bytes": nbytes, "limit_bytes": limit, "runs": results}, f, indent=2)


if __name__ == "__main__":
  main()
