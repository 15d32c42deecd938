"""What one worker process of `vs_pytorch.py` measures, each in a fresh process.

`time_worker`: a first run per framework (JAX's compile time apart), the
parity check, then alternating timed runs. `float64_worker`: both sides in
float64 and in float32. `memory_worker`: the peak memory of one run after
set-up and compilation. Each returns a JSON-ready dict; `options` is the
command line's namespace.
"""

import json
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np

from benchmarks import memory_probe
from benchmarks import parity
from benchmarks import runners
from benchmarks.bench_settings import Setting
from benchmarks.bench_settings import make_problem
from ccdd_jax.method import models


def log(message: str):
  """A progress line on stderr."""
  print(message, file=sys.stderr, flush=True)


def environment(options) -> dict:
  """Versions, devices and threads of this process."""
  info = {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jax_backend": jax.default_backend(),
    "jax_device": jax.devices()[0].device_kind,
    "conv_impl": models.resolve_conv_impl(options.conv_impl),
    "unroll": options.unroll,
    "remat": options.remat,
    "cpu_cores": len(os.sched_getaffinity(0)),
  }
  if "torch" in options.frameworks:
    torch, _ = runners.import_torch()
    info.update(
      torch=torch.__version__,
      torch_device=options.torch_device,
      torch_threads=torch.get_num_threads(),
    )
  return info


def setup_torch(options):
  """Sets torch's thread count and resolves `options.torch_device` ("auto")."""
  torch, _ = runners.import_torch()
  torch.set_num_threads(options.threads or len(os.sched_getaffinity(0)))
  options.torch_device = runners.torch_device(options.torch_device)


def time_worker(setting: Setting, options) -> dict:
  """Warm-up, parity check, then alternating timed runs of the chosen frameworks."""
  if "torch" in options.frameworks:
    setup_torch(options)
  problem = make_problem(setting, options.seed)
  result = {
    "setting": setting.name,
    "kind": setting.kind,
    "shapes": setting.describe(),
    "environment": environment(options),
    "load_average_start": os.getloadavg()[0],
  }
  framework_runners, outputs = {}, {}
  for framework in options.frameworks:
    runner = runners.make_runner(framework, setting, problem, options)
    compile_s = runner.prepare()
    runner.reset()
    begin = time.perf_counter()
    outputs[framework] = runner.run()
    first_s = time.perf_counter() - begin
    framework_runners[framework] = runner
    result[framework] = {"compile_s": compile_s, "first_run_s": first_s}
    if framework == "jax":
      result[framework]["xla_memory"] = memory_probe.xla_memory(runner.compiled)
    log(f"[{setting.name}] {framework}: compile {compile_s:.2f} s, first run {first_s:.2f} s")
  if len(framework_runners) == 2:
    result["parity"] = parity.check_parity(
      setting,
      framework_runners,
      outputs,
      problem,
      options.seed,
      options.loss_rtol,
      options.grad_rtol,
    )
    log(f"[{setting.name}] parity: {parity.parity_text(result['parity'])}")
  del outputs
  times = {framework: [] for framework in framework_runners}
  for repeat in range(options.repeats):
    order = list(framework_runners) if repeat % 2 == 0 else list(reversed(framework_runners))
    for framework in order:
      framework_runners[framework].reset()
      begin = time.perf_counter()
      framework_runners[framework].run()
      times[framework].append(time.perf_counter() - begin)
  result["load_average_end"] = os.getloadavg()[0]
  for framework, seconds in times.items():
    result[framework]["times_s"] = seconds
    result[framework]["median_s"] = statistics.median(seconds) if seconds else None
    if seconds:
      log(
        f"[{setting.name}] {framework}: median {1000 * statistics.median(seconds):.1f} ms "
        f"over {len(seconds)}"
      )
  return result


def float64_worker(setting: Setting, options) -> dict:
  """Both frameworks in float64 (must agree) and in float32 (error against float64).

  The problems are drawn before x64 is turned on, so that they hold the same
  values as the timing run's; the float64 one is the float32 one upcast.
  """
  setup_torch(options)
  problems = {
    name: make_problem(setting, options.seed, dtype)
    for name, dtype in (("float32", np.float32), ("float64", np.float64))
  }
  jax.config.update("jax_enable_x64", True)
  ends = {}
  for precision, problem in problems.items():
    for framework in runners.FRAMEWORKS:
      runner = runners.make_runner(framework, setting, problem, options)
      if setting.kind == "distill":
        runner.prepare()
        runner.reset()
        ends[(framework, precision)] = runner.result(runner.run())
      else:
        batches = parity.fixed_batches(setting, options.seed)
        ends[(framework, precision)] = (
          parity.jax_expert_end(runner, problem, batches)
          if framework == "jax"
          else parity.torch_expert_end(runner, batches)
        )
      log(f"[{setting.name}] float64 check: {framework} {precision} done")
  return {"setting": setting.name, **parity.float64_check(setting, ends, problems["float64"])}


def memory_worker(setting: Setting, framework: str, options, out_path: str = "") -> dict:
  """Peak memory of one run of `framework` on `setting`, after set-up and compilation.

  With `out_path`, JAX's XLA figures are written there before the run, so
  that they survive a worker killed during it.
  """
  if framework == "torch":
    setup_torch(options)
  problem = make_problem(setting, options.seed)
  runner = runners.make_runner(framework, setting, problem, options)
  runner.prepare()
  runner.reset()
  result = {"setting": setting.name, "framework": framework}
  on_gpu = (
    jax.default_backend() == "gpu"
    if framework == "jax"
    else options.torch_device.startswith("cuda")
  )
  if framework == "jax":
    result["xla_memory"] = memory_probe.xla_memory(runner.compiled)
    if out_path:
      with open(out_path, "w") as out:
        json.dump(result, out)
  if not on_gpu:
    result.update(memory_probe.host_peak(runner.run))
  elif framework == "jax":
    result.update(memory_probe.jax_device_peak(runner.run))
  else:
    result.update(memory_probe.torch_device_peak(runner.torch, runner.run))
  return result
