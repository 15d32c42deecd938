r"""Peak memory of one distillation iteration per remat policy, as XLA plans it.

  python benchmarks/memory.py                          # digits, CIFAR-10 IPC 10 and IPC 1
  python benchmarks/memory.py --settings digits --steps 20,80 --remat none,nested

One iteration = `value_and_grad` of the eq. 10 meta loss with respect to the
images and the step size (N student steps with DSA and their backward pass).
The figures come from the compiled executable's `memory_analysis()`: temp =
XLA's scratch buffers (what the backward pass stores lives here), peak =
arguments + outputs + temp - aliased bytes. They are exact for the compiled
program and do not depend on machine load. The target: peak memory grows
<= 1.25x from syn_steps 20 to 80 (the `x80/20` column).
"""

import argparse
import os
import platform

import jax
import jax.numpy as jnp

from ccdd_jax.config import schema as settings_lib
from ccdd_jax.method import distill
from ccdd_jax.method import inner_loop
from ccdd_jax.method import models

# name -> (images per class, side, channels, ConvNet width, depth); 10 classes.
SETTINGS = {
  "digits": (10, 8, 1, 16, 2),  # configs/digits.py
  "cifar10_ipc10": (10, 32, 3, 128, 3),  # configs/cifar10_ipc10.py shapes
  "cifar10_ipc1": (1, 32, 3, 128, 3),  # configs/cifar10_ipc1.py shapes
}


def iteration_memory(
  setting: str, steps: int, remat: str, conv_impl: str, unroll: str, dsa: str
) -> dict:
  """memory_analysis() figures (bytes) of one compiled distillation iteration."""
  ipc, side, channels, width, depth = SETTINGS[setting]
  model_config = settings_lib.section("model", width=width, depth=depth, conv_impl=conv_impl)
  shape = (side, side, channels)
  network = models.build_network("convnet", 10, shape, model_config)
  num = 10 * ipc
  cfg = settings_lib.section("distill", syn_steps=steps, batch_syn=0, beta=0.5)
  dsa_config = settings_lib.section("dsa", strategy=dsa)
  meta = distill.make_meta_loss(
    cfg, network.apply_flat, dsa_config, num, unroll=unroll, remat=remat
  )
  grad = jax.jit(jax.value_and_grad(meta, argnums=(0, 1)))
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  p = sum(leaf.size for leaf in jax.tree_util.tree_leaves(network.like_params()))
  compiled = grad.lower(
    f32(num, *shape),
    f32(),
    jax.ShapeDtypeStruct((num,), jnp.int32),
    f32(p),
    f32(p),
    f32(p),
    f32(p),
    jax.random.PRNGKey(0),
  ).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    raise SystemExit(f"memory_analysis() is not available on {jax.default_backend()}")
  out = {
    "params": p,
    "temp": stats.temp_size_in_bytes,
    "arguments": stats.argument_size_in_bytes,
    "outputs": stats.output_size_in_bytes,
    "alias": stats.alias_size_in_bytes,
  }
  out["peak"] = out["arguments"] + out["outputs"] + out["temp"] - out["alias"]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--steps", default="20,40,80")
  parser.add_argument("--remat", default=",".join(inner_loop.REMAT_POLICIES))
  parser.add_argument("--conv", default="auto", help="model.conv_impl")
  parser.add_argument("--unroll", default="1", help="distill.unroll")
  parser.add_argument("--dsa", default="color_crop_cutout_flip_scale_rotate")
  args = parser.parse_args()
  conv_impl = models.resolve_conv_impl(args.conv)
  print(
    f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); "
    f"host {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
  )
  print(
    f"conv_impl {conv_impl}, unroll {args.unroll}, DSA {args.dsa!r}, beta 0.5, "
    f"batch_syn = all; MiB = 2^20 bytes"
  )
  steps = [int(s) for s in args.steps.split(",")]
  print(
    f"{'setting':14} {'remat':7} {'P':>8} "
    + " ".join(f"{'temp@' + str(n):>10} {'peak@' + str(n):>10}" for n in steps)
    + f" {'peak x' + str(steps[-1]) + '/' + str(steps[0]):>12}"
  )
  for setting in args.settings.split(","):
    for remat in args.remat.split(","):
      figures = [
        iteration_memory(setting, n, remat, conv_impl, args.unroll, args.dsa) for n in steps
      ]
      mib = lambda b: f"{b / 2**20:10.1f}"
      print(
        f"{setting:14} {remat:7} {figures[0]['params']:8d} "
        + " ".join(f"{mib(f['temp'])} {mib(f['peak'])}" for f in figures)
        + f" {figures[-1]['peak'] / figures[0]['peak']:12.2f}",
        flush=True,
      )


if __name__ == "__main__":
  main()
