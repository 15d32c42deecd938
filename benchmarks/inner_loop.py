r"""Times one distillation meta-gradient (N student steps + backward to the images)
for each convolution implementation and scan unroll, side by side.

  python benchmarks/inner_loop.py                       # digits shapes
  python benchmarks/inner_loop.py --image 32 --channels 3 --width 128 --depth 3 --num 10
  python benchmarks/inner_loop.py --unrolls 1,2,5,full --remat none,full,nested

Prints, per configuration, the compile time, the median wall and CPU time
per iteration, the ratio to the fastest configuration, to the fully unrolled
loop with the same convolution and remat, and to the fastest fully unrolled
configuration of all. The last is the scan penalty (the target: <= 1.3x on
CPU, ~1x on GPU); "full" must be in --unrolls for these ratios. It is the
measurement behind `model.conv_impl = "auto"` and `distill.unroll = "auto"`.
"""

import argparse
import os
import platform
import statistics
import time

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp

from ccdd_jax.config import schema
from ccdd_jax.method import distill
from ccdd_jax.method import inner_loop
from ccdd_jax.method import models


def machine() -> str:
  """One line naming jax, the backend, the device and the host's CPUs and load."""
  load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
  return (
    f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
    f"host {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
    f"load average {load}"
  )


def time_meta_gradient(conv_impl: str, unroll: int, remat: str, args) -> tuple[float, float, float]:
  """(compile seconds, median wall and CPU seconds per iteration) of one configuration."""
  # "shift_nhwc": the shift convolutions on NHWC arrays (ConvNet's "shift"
  # runs channel-major), to measure what the layout alone is worth.
  net = models.ConvNet(
    num_classes=10,
    width=args.width,
    depth=args.depth,
    conv_impl="shift" if conv_impl == "shift_nhwc" else conv_impl,
    channels_first=False if conv_impl == "shift_nhwc" else None,
  )
  shape = (args.image, args.image, args.channels)
  params = models.init_params(net, shape, jax.random.PRNGKey(0))
  flat, unravel = ravel_pytree(params)
  apply_flat = lambda w, x: net.apply({"params": unravel(w)}, x)
  cfg = schema.section("distill", syn_steps=args.steps, batch_syn=0, beta=0.0)
  dsa = schema.section("dsa", strategy=args.dsa)
  images = jax.random.normal(jax.random.PRNGKey(1), (args.num,) + shape)
  labels = jnp.arange(args.num) % 10
  meta = distill.make_meta_loss(cfg, apply_flat, dsa, args.num, unroll=unroll, remat=remat)
  grad = jax.jit(jax.value_and_grad(meta, argnums=(0, 1)))
  call = lambda: grad(
    images, jnp.float32(0.01), labels, flat, flat + 0.01, flat, flat + 0.01, jax.random.PRNGKey(2)
  )
  start = time.perf_counter()
  jax.block_until_ready(call())
  compile_s = time.perf_counter() - start
  times, cpu_times = [], []
  for _ in range(args.repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  return compile_s, statistics.median(times), statistics.median(cpu_times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image", type=int, default=8)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--num", type=int, default=100, help="synthetic images (batch_syn = all)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--dsa", default="color_crop_cutout_flip_scale_rotate")
  parser.add_argument(
    "--convs",
    default="lax,im2col,shift_nhwc,shift",
    help="comma-separated conv_impl values (shift_nhwc: shift on NHWC)",
  )
  parser.add_argument(
    "--unrolls", default="1,full", help="comma-separated distill.unroll values (1 = rolled)"
  )
  parser.add_argument(
    "--remat",
    default=schema.base_config().distill.remat,
    help="comma-separated distill.remat values (inner_loop.REMAT_POLICIES)",
  )
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(machine())
  print(
    f"images {args.num}x{args.image}x{args.image}x{args.channels}, ConvNet width "
    f"{args.width} depth {args.depth}, {args.steps} steps, DSA {args.dsa!r}, "
    f"distill.unroll 'auto' -> "
    f"{inner_loop.resolve_unroll('auto', args.steps)}, model.conv_impl 'auto' -> "
    f"{models.resolve_conv_impl('auto')}"
  )
  unrolls = [inner_loop.resolve_unroll(u, args.steps) for u in args.unrolls.split(",")]
  results = {}
  for conv_impl in args.convs.split(","):
    for remat in args.remat.split(","):
      for unroll in unrolls:
        results[(conv_impl, remat, unroll)] = time_meta_gradient(conv_impl, unroll, remat, args)
        print(f"  measured {conv_impl} remat {remat} unroll {unroll}", flush=True)
  best = min(t for _, t, _ in results.values())
  print(
    "ms / iter: median wall time; cpu ms: median process CPU time (all threads), less "
    "sensitive to other load; x unrolled: time / the fully unrolled loop's with the same "
    "conv and remat; x best unrolled: time / the fastest fully unrolled configuration's"
  )
  # The fully unrolled loop is the reference of the scan penalty ("full" in --unrolls).
  unrolled_runs = [r for k, r in results.items() if k[2] == args.steps]
  best_unrolled = (
    (min(r[1] for r in unrolled_runs), min(r[2] for r in unrolled_runs))
    if unrolled_runs
    else (float("nan"), float("nan"))
  )
  print(
    f"{'conv':8} {'remat':7} {'unroll':>7} {'compile s':>10} {'ms / iter':>10} "
    f"{'cpu ms':>8} {'x fastest':>10} {'x unrolled':>11} {'cpu x unrolled':>15} "
    f"{'x best unrolled':>16} {'cpu x best unr.':>16}"
  )
  for (conv_impl, remat, unroll), (compile_s, t, cpu) in results.items():
    name = "rolled" if unroll == 1 else ("full" if unroll == args.steps else str(unroll))
    _, unrolled, unrolled_cpu = results.get(
      (conv_impl, remat, args.steps), (0.0, float("nan"), float("nan"))
    )
    print(
      f"{conv_impl:8} {remat:7} {name:>7} {compile_s:10.2f} {1000 * t:10.1f} "
      f"{1000 * cpu:8.1f} {t / best:10.2f} {t / unrolled:11.2f} {cpu / unrolled_cpu:15.2f} "
      f"{t / best_unrolled[0]:16.2f} {cpu / best_unrolled[1]:16.2f}"
    )


if __name__ == "__main__":
  main()
