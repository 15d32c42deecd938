r"""Times one distillation meta-gradient (N student steps + backward to the images)
for each convolution implementation, rolled and unrolled, side by side.

  python benchmarks/inner_loop.py                       # digits shapes
  python benchmarks/inner_loop.py --image 32 --channels 3 --width 128 --depth 3 --num 10

Prints the median time per iteration and each one's ratio to the fastest.
It is the measurement behind `model.conv_impl = "auto"` (im2col on CPU).
"""

import argparse
import statistics
import time

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import ml_collections

from ccdd_jax import distill
from ccdd_jax import models


def time_meta_gradient(conv_impl: str, unroll: int, args) -> tuple[float, float]:
  """(compile seconds, median seconds per iteration) of one configuration."""
  net = models.ConvNet(num_classes=10, width=args.width, depth=args.depth, conv_impl=conv_impl)
  shape = (args.image, args.image, args.channels)
  params = models.init_params(net, shape, jax.random.PRNGKey(0))
  flat, unravel = ravel_pytree(params)
  apply_flat = lambda w, x: net.apply({"params": unravel(w)}, x)
  cfg = ml_collections.ConfigDict({"syn_steps": args.steps, "batch_syn": 0, "beta": 0.0})
  dsa = ml_collections.ConfigDict({"strategy": args.dsa})
  images = jax.random.normal(jax.random.PRNGKey(1), (args.num,) + shape)
  labels = jnp.arange(args.num) % 10
  meta = distill.make_meta_loss(cfg, apply_flat, dsa, args.num, unroll=unroll)
  grad = jax.jit(jax.value_and_grad(meta, argnums=(0, 1)))
  call = lambda: grad(images, jnp.float32(0.01), labels, flat, flat + 0.01, flat, flat + 0.01,
                      jax.random.PRNGKey(2))
  start = time.perf_counter()
  jax.block_until_ready(call())
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    jax.block_until_ready(call())
    times.append(time.perf_counter() - start)
  return compile_s, statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image", type=int, default=8)
  parser.add_argument("--channels", type=int, default=1)
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--num", type=int, default=100, help="synthetic images (batch_syn = all)")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--dsa", default="color_crop_cutout_flip_scale_rotate")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"images {args.num}x{args.image}x{args.image}x{args.channels}, ConvNet width "
        f"{args.width} depth {args.depth}, {args.steps} steps, DSA {args.dsa!r}")
  results = {}
  for conv_impl in ("lax", "im2col"):
    for unroll in (1, args.steps):
      results[(conv_impl, unroll)] = time_meta_gradient(conv_impl, unroll, args)
  best = min(t for _, t in results.values())
  print(f"{'conv':8} {'scan':10} {'compile s':>10} {'ms / iter':>10} {'x fastest':>10}")
  for (conv_impl, unroll), (compile_s, t) in results.items():
    scan = "rolled" if unroll == 1 else "unrolled"
    print(f"{conv_impl:8} {scan:10} {compile_s:10.2f} {1000 * t:10.1f} {t / best:10.2f}")


if __name__ == "__main__":
  main()
