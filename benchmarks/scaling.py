r"""The stages on 1, 2, 4 and 8 simulated CPU devices, side by side (docs/scaling.md).

  python benchmarks/scaling.py                         # 1 2 4 8 devices, digits config
  python benchmarks/scaling.py --devices 1 4 --out /tmp/scaling.json

Each device count runs in its own subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=N and JAX_PLATFORMS=cpu (the
count is fixed when JAX starts), through the project's own code paths:

  expert epoch   experts.train_experts_resumable: `--experts` clean experts of
                 configs/digits.py in one vmapped group, the expert axis split
                 over the devices; the wall time between two saved epochs
                 (compile happens before the first epoch and is timed apart).
  distill iter   distill.distill on the digits config (IPC 10, N = syn_steps,
                 `--batch_syn` images per student step, split over the
                 devices); each iteration is waited for; the first one
                 (compile) is reported apart, the others averaged.
  memory         XLA's memory analysis of the compiled distillation step, per
                 device: arguments + outputs + temporaries - aliased (donated)
                 bytes. "host-resident": the step takes the iteration's
                 (start, target) pairs, as distill.distill runs it; "device-
                 resident": the step takes every trajectory (the layout before
                 issue 12). JAX's allocator statistics (`memory_stats()`) are
                 used instead where the backend has them (not XLA:CPU).
  pair transfer  host -> device time of one iteration's pairs (4 flat
                 parameter vectors, replicated on every device).

Simulated devices share the machine's cores: the figures show the overhead of
splitting and the correctness of the sharded programs, not a speed-up.
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
from jax.flatten_util import ravel_pytree
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _TimedStore:
  """experts.ExpertStore that keeps nothing but the time each epoch is saved."""

  def __init__(self):
    self.times = []

  def finished(self, kind, start, size):
    return False

  def epochs_done(self, kind, start, size):
    return []

  def save_epoch(self, kind, start, epoch, params):
    self.times.append(time.perf_counter())

  def finish(self, kind, start, trajectory):
    pass


def _bytes(tree) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


def _peak(compiled, memory_probe) -> dict:
  """Per-device bytes of one compiled step (XLA's memory analysis)."""
  m = memory_probe.xla_memory(compiled)
  if not m:
    return {}
  aliased = 0
  try:
    aliased = int(compiled.memory_analysis().alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except  # Older jaxlib: no alias figure.
    pass
  peak = m["argument_size_in_bytes"] + m["output_size_in_bytes"] + m["temp_size_in_bytes"]
  return {"peak_bytes": peak - aliased, **m, "alias_size_in_bytes": aliased}


def _context(args):
  """The config, run context and device mesh of one worker, experts set from the flags."""
  from ccdd_jax.config import loader as config_loader  # pylint: disable=g-import-not-at-top
  from ccdd_jax.devices import sharding  # pylint: disable=g-import-not-at-top
  from ccdd_jax.method import watermark  # pylint: disable=g-import-not-at-top
  from ccdd_jax.run import context  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh()
  config = config_loader.load(args.config)
  config.experts.num_experts, config.experts.group_size = args.experts, 0
  config.experts.epochs = args.epochs
  tmp = tempfile.mkdtemp()
  key_file = os.path.join(tmp, "owner.key")
  watermark.write_key_file(key_file, bytes(range(32)))  # A public key: timing only.
  return config, context.Context(config, tmp, key_file), mesh


def _time_experts(args, config, ctx, mesh) -> tuple[dict, object]:
  """Expert epoch times of one vmapped group of clean experts, and their initial parameters."""
  from ccdd_jax.method import experts  # pylint: disable=g-import-not-at-top

  # Experts: one vmapped group of clean experts, the expert axis over the devices.
  init = ctx.net.init_params(jax.random.PRNGKey(0), args.experts)
  store = _TimedStore()
  start = time.perf_counter()
  experts.train_experts_resumable(
    "clean",
    config.experts,
    ctx.net.apply,
    config.dsa,
    init,
    init,
    jax.random.PRNGKey(1),
    ctx.expert_inputs,
    store,
    concurrency=1,
    mesh=mesh,
  )
  epochs = np.diff([start, *store.times])
  out = {"expert_first_epoch_s": float(epochs[0])}  # Includes compilation.
  out["expert_epoch_s"] = float(np.mean(epochs[1:]))
  return out, init


def _distill_problem(args, config, ctx, init) -> tuple:
  """The distillation config, synthetic images and labels, and random trajectories."""
  from ccdd_jax.method import embedding  # pylint: disable=g-import-not-at-top

  # Distillation: random trajectories around the initial parameters (timing only).
  cfg = embedding.set_config(config.distill, watermarked=False)
  cfg.iterations, cfg.batch_syn = args.iterations + 1, args.batch_syn
  if args.syn_steps:
    cfg.syn_steps = args.syn_steps
  ds = ctx.dataset
  images, labels, _ = embedding.init_synthetic(
    ds.train_images, ds.train_labels, ds.num_classes, cfg.ipc, ctx.np_rng(3)
  )
  images = ctx.preprocess.apply(images)
  flat = np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda x: x[0], init))[0])
  epochs_needed = cfg.max_start_epoch + cfg.expert_epochs + 1
  rng = np.random.default_rng(0)
  traj = (flat + 0.01 * rng.standard_normal((args.experts, epochs_needed, flat.size))).astype(
    np.float32
  )
  return cfg, images, labels, (traj, traj)


def _time_distill(cfg, config, ctx, mesh, images, labels, trajectories) -> dict:
  """Distillation iteration times (the first, with compilation, apart) and sizes."""
  from ccdd_jax.method import distill  # pylint: disable=g-import-not-at-top

  times = []

  def progress(it, loss):
    loss.block_until_ready()
    times.append(time.perf_counter())

  start = time.perf_counter()
  distill.distill(
    cfg,
    ctx.net.apply_flat,
    config.dsa,
    images,
    labels,
    trajectories,
    jax.random.PRNGKey(2),
    progress,
    mesh=mesh,
  )
  iters = np.diff([start, *times])
  out = {"distill_first_iteration_s": float(iters[0])}
  out["distill_iteration_s"] = float(np.mean(iters[1:]))
  out.update(num_syn=int(images.shape[0]), batch_syn=cfg.batch_syn, syn_steps=cfg.syn_steps)
  return out


def _memory_and_transfer(cfg, config, ctx, mesh, images, labels, trajectories) -> dict:
  """Per-device memory of the step, host- and device-resident, and the pairs' transfer time."""
  from benchmarks import memory_probe  # pylint: disable=g-import-not-at-top
  from ccdd_jax.devices import sharding  # pylint: disable=g-import-not-at-top
  from ccdd_jax.method import distill  # pylint: disable=g-import-not-at-top
  from ccdd_jax.method import trajectory_pairs  # pylint: disable=g-import-not-at-top

  # Memory per iteration: the step with the pairs (host-resident trajectories)
  # and with every trajectory on the devices.
  out = {}
  state = sharding.put_replicated(distill.init_state(cfg, images, labels), mesh)
  key = sharding.to_device(jax.random.PRNGKey(3), mesh)
  pair = trajectory_pairs.select_pair(trajectories, {"e": 0, "t": 0}, cfg.expert_epochs)
  on_device = sharding.to_device(pair, mesh)
  step = distill.make_distill_step(cfg, ctx.net.apply_flat, config.dsa, images.shape[0], mesh)
  out["memory_host_resident"] = _peak(step.lower(state, on_device, key).compile(), memory_probe)
  whole = jax.jit(
    distill.make_distill_update(cfg, ctx.net.apply_flat, config.dsa, images.shape[0], mesh),
    donate_argnums=(0,),
  )
  all_trajs = sharding.to_device(trajectories, mesh)
  out["memory_device_resident"] = _peak(whole.lower(state, all_trajs, key).compile(), memory_probe)
  stats = jax.devices()[0].memory_stats()
  out["memory_stats_available"] = bool(stats)
  out["trajectory_bytes"] = _bytes(trajectories)
  out["pair_bytes"] = _bytes(pair)
  put_times = []
  for _ in range(20):
    t0 = time.perf_counter()
    jax.block_until_ready(sharding.to_device(pair, mesh))
    put_times.append(time.perf_counter() - t0)
  out["pair_transfer_s"] = float(np.median(put_times))
  return out


def worker(args) -> dict:
  """One device count: the figures of this process's devices."""
  n = len(jax.devices())
  config, ctx, mesh = _context(args)
  out = {"devices": n, "backend": jax.default_backend()}
  expert_figures, init = _time_experts(args, config, ctx, mesh)
  out.update(expert_figures)
  cfg, images, labels, trajectories = _distill_problem(args, config, ctx, init)
  out.update(_time_distill(cfg, config, ctx, mesh, images, labels, trajectories))
  out.update(_memory_and_transfer(cfg, config, ctx, mesh, images, labels, trajectories))
  return out


def run_all(args) -> list[dict]:
  results = []
  for n in args.devices:
    env = dict(
      os.environ,
      XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", *_passed(args)]
    print(f"{n} device(s) ...", file=sys.stderr, flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
      sys.exit(f"{n} devices failed:\n{done.stderr[-3000:]}")
    results.append(json.loads(done.stdout.strip().splitlines()[-1]))
  return results


def _passed(args) -> list[str]:
  return [
    f"--config={args.config}",
    f"--experts={args.experts}",
    f"--epochs={args.epochs}",
    f"--iterations={args.iterations}",
    f"--batch_syn={args.batch_syn}",
    f"--syn_steps={args.syn_steps}",
  ]


def table(results: list[dict]) -> str:
  mib = lambda b: f"{b / 2**20:.2f}" if b else "n/a"
  rows = [
    ("expert epoch, s (after compile)", lambda r: f"{r['expert_epoch_s']:.2f}"),
    ("first expert epoch incl. compile, s", lambda r: f"{r['expert_first_epoch_s']:.1f}"),
    ("distill iteration, s (after compile)", lambda r: f"{r['distill_iteration_s']:.3f}"),
    ("first iteration incl. compile, s", lambda r: f"{r['distill_first_iteration_s']:.1f}"),
    (
      "peak MiB/device/iteration, host-resident",
      lambda r: mib(r["memory_host_resident"].get("peak_bytes")),
    ),
    (
      "  of which arguments",
      lambda r: mib(r["memory_host_resident"].get("argument_size_in_bytes")),
    ),
    (
      "peak MiB/device/iteration, device-resident",
      lambda r: mib(r["memory_device_resident"].get("peak_bytes")),
    ),
    ("pair host->device per iteration, ms", lambda r: f"{1e3 * r['pair_transfer_s']:.3f}"),
  ]
  head = "| | " + " | ".join(f"{r['devices']} device(s)" for r in results) + " |"
  lines = [head, "|---" * (len(results) + 1) + "|"]
  lines += ["| " + name + " | " + " | ".join(f(r) for r in results) + " |" for name, f in rows]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--config", default="digits")
  parser.add_argument("--experts", type=int, default=8, help="clean experts, one group")
  parser.add_argument("--epochs", type=int, default=3, help="expert epochs (>= 2 timed)")
  parser.add_argument("--iterations", type=int, default=5, help="timed distillation iterations")
  parser.add_argument("--batch_syn", type=int, default=64, help="images per student step")
  parser.add_argument("--syn_steps", type=int, default=0, help="0: the config's")
  parser.add_argument("--out", default="", help="also write the figures as JSON here")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args)))
    return
  results = run_all(args)
  print(
    f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
    f"jax {jax.__version__}; simulated CPU devices share these cores"
  )
  r0 = results[0]
  print(
    f"# distillation: {r0['num_syn']} synthetic images, {r0['batch_syn']} per step, "
    f"N = {r0['syn_steps']}; trajectories {r0['trajectory_bytes'] / 2**20:.2f} MiB on the host, "
    f"{r0['pair_bytes'] / 2**10:.1f} KiB of pairs per iteration; "
    f"allocator statistics: {'yes' if r0['memory_stats_available'] else 'none (XLA analysis)'}"
  )
  print(table(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
