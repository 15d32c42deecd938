r"""Times MTT's distillation iteration and expert epoch in ccdd_jax and in PyTorch, side by side.

  pip install -e '.[bench]'                                  # torch, for the PyTorch side
  python benchmarks/vs_pytorch.py                            # the default settings (slow on CPU)
  python benchmarks/vs_pytorch.py --settings digits --repeats 3
  python benchmarks/vs_pytorch.py --quick --settings digits,digits_expert   # smoke test
  python benchmarks/vs_pytorch.py --settings cifar10_ipc1_s20 --float64_check --json out.json
  python benchmarks/vs_pytorch.py --frameworks jax --settings cifar10_ipc10_s30   # no torch needed
  python benchmarks/vs_pytorch.py --list                     # every setting and its shapes

(`python -m benchmarks.vs_pytorch ...` from the repository root works too.) This
script holds the command line, the spawning of worker processes and the
tables; the settings, runners, parity maths, memory probes and worker
measurements are modules of the `benchmarks` package (see its __init__.py).

The JAX side is the project's own code path: `distill.make_meta_loss` under
`jax.jit(jax.value_and_grad(argnums=(0, 1)))` with `models.ConvNet`
(`--conv_impl`, default "auto" = shift convolutions on CPU), and `experts.make_trainer`
for one epoch. The PyTorch side (`torch_mtt.py`) is the reference
implementation's computation: a flat parameter vector, N steps with
`torch.autograd.grad(create_graph=True)`, the normalised distance, backward
to the images and the step size; and a plain `torch.optim.SGD` epoch. Both
start from the same parameters and data, batch_syn = the whole synthetic set,
and neither applies DSA (strategy "none").

Per setting, each step in a fresh subprocess:
1. Peak memory, per framework: on CPU, the growth of the resident set during
   the first run after set-up and compilation (VmHWM - VmRSS, the high-water
   mark reset just before the run through /proc/self/clear_refs); on GPU, the
   allocator's peak bytes in use. For JAX also the compiled executable's temp
   buffers (`memory_analysis()`). A framework whose run does not fit
   (--max_rss_gb, default 90% of the memory available at start) is not timed.
2. Timing: each side runs once (JAX's compile time is reported apart), the
   results are compared, then the two alternate `--repeats` times (the order
   flips every round) and the medians are reported. The comparison: loss,
   image gradient and step-size gradient (expert: the parameter update after
   one epoch over the same minibatches), relative L2 error of JAX against
   torch, allowed up to max(rtol, 3 x torch's own float32 spread) — the gap
   between torch's two float32 convolution paths — because on CIFAR shapes
   the image gradient is ill-conditioned enough that float32 puts either
   framework a few 1e-3 away from float64 (IPC 1, 20 steps).
3. With --float64_check: both sides in float64 (they must agree to 1e-8),
   and each side's float32 error against float64.

The 1-minute load average is recorded around each timing run: on a machine
with other work running, the medians are not comparable (torch's OpenMP
threads suffer most).

The exit status is 1 when a parity check fails or a worker fails.
"""

import argparse
from collections.abc import Sequence
import json
import os
import pathlib
import sys
import tempfile

# Run as `python benchmarks/vs_pytorch.py`: the repository root holds the `benchmarks` package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from benchmarks import memory_probe
from benchmarks import parity
from benchmarks import workers
from benchmarks.bench_settings import DEFAULT_SETTINGS
from benchmarks.bench_settings import Setting
from benchmarks.bench_settings import all_settings
from benchmarks.bench_settings import resolve_settings
from benchmarks.runners import FRAMEWORKS
from ccdd_jax.config import schema as settings_lib


def chosen_settings(spec: str) -> list[Setting]:
  """The settings `spec` names (see resolve_settings); exits with a one-line error if unknown."""
  try:
    return resolve_settings(spec)
  except ValueError as e:
    raise SystemExit(f"error: {e}") from e


def spawn_worker(mode: str, setting: Setting, args, frameworks: Sequence[str]) -> dict:
  """Runs a worker in a fresh Python process; kills it past --max_rss_gb or --timeout_s."""
  with tempfile.TemporaryDirectory() as tmp:
    out_path = os.path.join(tmp, "result.json")
    command = [
      sys.executable,
      os.path.abspath(__file__),
      "--_worker",
      mode,
      "--_out",
      out_path,
      "--settings",
      setting.name,
      "--frameworks",
      ",".join(frameworks),
      "--repeats",
      str(args.repeats),
      "--conv_impl",
      args.conv_impl,
      "--unroll",
      args.unroll,
      "--remat",
      args.remat,
      "--torch_device",
      args.torch_device,
      "--seed",
      str(args.seed),
      "--threads",
      str(args.threads),
      "--loss_rtol",
      str(args.loss_rtol),
      "--grad_rtol",
      str(args.grad_rtol),
    ]
    env = dict(os.environ)
    if mode != "memory" and len(frameworks) == 2:
      # On a GPU, JAX would otherwise take 75% of its memory before torch runs.
      env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    written, killed_for, status = memory_probe.run_watched(
      command, env, out_path, int(args.max_rss_gb * 1024**2), args.timeout_s
    )
  if killed_for == "memory":
    failure = f"killed: resident memory over --max_rss_gb={args.max_rss_gb:g}"
  elif killed_for == "time":
    failure = f"killed: ran over --timeout_s={args.timeout_s:g}"
  elif status != 0:
    failure = f"worker exited with status {status}"
  else:
    return written
  workers.log(f"[{setting.name}] {mode} {','.join(frameworks)}: {failure}")
  return {**written, "error": failure}


def _ms(seconds) -> str:
  """Seconds as milliseconds for the table."""
  return "-" if seconds is None else f"{1000 * seconds:.1f}"


def _mb(num_bytes) -> str:
  """Bytes as MB for the table."""
  return "-" if num_bytes is None else f"{num_bytes / 1e6:.0f}"


def _memory_cell(memory: dict) -> str:
  """Peak MB of a memory worker, or why there is none."""
  if "error" in memory:
    return "killed" if memory["error"].startswith("killed") else "failed"
  return _mb(memory.get("peak_bytes"))


def table(rows: list[dict], kind: str) -> str:
  """The markdown table of one kind of setting."""
  unit = "ms / iteration" if kind == "distill" else "ms / epoch"
  lines = [
    f"| setting | shapes | JAX {unit} | torch {unit} | torch / JAX | JAX compile s "
    "| JAX peak MB | XLA temp MB | torch peak MB | JAX vs torch (torch's f32 spread) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    timing = row.get("timing", {})
    jax_t = timing.get("jax", {}).get("median_s")
    torch_t = timing.get("torch", {}).get("median_s")
    ratio = f"{torch_t / jax_t:.2f}" if jax_t and torch_t else "-"
    compile_s = timing.get("jax", {}).get("compile_s")
    memory = row.get("memory", {})
    temp = memory.get("jax", {}).get("xla_memory", {}).get("temp_size_in_bytes")
    if temp is None:
      temp = timing.get("jax", {}).get("xla_memory", {}).get("temp_size_in_bytes")
    cells = [
      row["setting"],
      row["shapes"],
      _ms(jax_t),
      _ms(torch_t),
      ratio,
      "-" if compile_s is None else f"{compile_s:.1f}",
      _memory_cell(memory.get("jax", {})),
      _mb(temp),
      _memory_cell(memory.get("torch", {})),
      parity.parity_text(timing.get("parity")),
    ]
    if "error" in timing:
      cells[-1] = timing["error"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def run_setting(setting: Setting, args, environments: list[dict]) -> dict:
  """One setting's memory, timing and float64 workers as a table row; appends its environment."""
  row = {
    "setting": setting.name,
    "kind": setting.kind,
    "shapes": setting.describe(),
    "memory": {},
  }
  if args.memory:  # First, so that a framework that runs out of memory is not timed.
    for framework in args.frameworks:
      row["memory"][framework] = spawn_worker("memory", setting, args, (framework,))
  fitting = [f for f in args.frameworks if "error" not in row["memory"].get(f, {})]
  row["timing"] = (
    spawn_worker("time", setting, args, fitting)
    if fitting
    else {"error": "not timed: every framework failed its memory run"}
  )
  if "environment" in row["timing"]:
    environments.append(row["timing"].pop("environment"))
  if args.float64_check:
    row["float64"] = (
      spawn_worker("float64", setting, args, FRAMEWORKS)
      if len(fitting) == 2
      else {"error": "skipped: a float32 run failed"}
    )
  return row


def row_failed(row: dict) -> bool:
  """Whether a worker of the row failed or a parity check did not pass."""
  results = [row["timing"], *row["memory"].values(), row.get("float64", {})]
  return (
    any("error" in result for result in results)
    or not row["timing"].get("parity", {"ok": True})["ok"]
    or not row.get("float64", {"ok": True}).get("ok", True)
  )


def print_notes(env: dict, args) -> None:
  """Prints the title and the notes on the environment and on what is measured."""
  print("\n# JAX (ccdd_jax) vs PyTorch (MTT reference computation)\n")
  print(
    f"- python {env.get('python', '?')}, jax {env.get('jax', '?')} on "
    f"{env.get('jax_backend', '?')} ({env.get('jax_device', '?')}), conv_impl "
    f"{env.get('conv_impl', '?')}, unroll {args.unroll}, remat {args.remat}; XLA uses its "
    "default thread pool"
  )
  if "torch" in env:
    print(
      f"- torch {env['torch']} on {env['torch_device']}, {env['torch_threads']} intra-op threads"
    )
  print(
    f"- {env.get('cpu_cores', '?')} CPU cores available; {args.repeats} alternating timed "
    "runs per framework (order flipped every round), medians reported; JAX compile "
    "time excluded from them and reported apart"
  )
  print(
    '- no DSA on either side (strategy "none"); batch_syn = the whole synthetic set; '
    "the optimiser step on the images is not timed; beta = 0 (no twin term)"
  )
  print(
    "- peak MB: on CPU, growth of the resident set over one run after set-up and "
    "compilation (VmHWM - VmRSS, fresh process per framework and setting); on GPU, the "
    "allocator's peak bytes in use. XLA temp MB: the executable's temp buffers "
    "(memory_analysis)"
  )
  if len(args.frameworks) == 2:
    print(
      "- JAX vs torch: relative L2 error of JAX against torch (as timed) on the same "
      "parameters and data after one run: loss, image gradient, lr gradient; expert: the "
      "parameter update after one epoch over the same minibatches. In brackets: torch's own "
      "float32 spread, the gap between its two convolution paths (oneDNN on/off on CPU, "
      "TF32 on/off on GPU). ok when each error <= "
      f"max(rtol, {parity.SPREAD_FACTOR:g} x spread), rtol {args.loss_rtol:g} for the loss, "
      f"{args.grad_rtol:g} otherwise"
    )


def print_failures(rows: list[dict]) -> None:
  """Prints each failed worker of every row, if any."""
  failures = [
    f"{row['setting']} {what}: {worker['error']}"
    for row in rows
    for what, worker in [
      ("timing", row["timing"]),
      ("float64", row.get("float64", {})),
      *[(f"memory {f}", m) for f, m in row["memory"].items()],
    ]
    if "error" in worker
  ]
  if failures:
    print("\nFailures:\n" + "\n".join(f"- {failure}" for failure in failures))


def print_float64(rows: list[dict]) -> None:
  """Prints the float64 check's table, if any row has one."""
  float64_rows = [row for row in rows if "float64" in row]
  if float64_rows:
    print(
      f"\n## Float64 check\n\nBoth sides in float64 must agree (relative error <= "
      f"{parity.FLOAT64_RTOL:g}); then each side's float32 error against float64.\n"
    )
    print(
      "| setting | float64: torch vs JAX | float32 JAX error | float32 torch error |\n"
      "|---|---|---|---|"
    )
    for row in float64_rows:
      check = row["float64"]
      if "error" in check:
        print(f"| {row['setting']} | {check['error']} | - | - |")
        continue
      print(
        f"| {row['setting']} | {'ok' if check['ok'] else 'FAIL'}: "
        f"{parity.errors_text(check['float64_torch_vs_jax'])} | "
        f"{parity.errors_text(check['float32_error_jax'])} | "
        f"{parity.errors_text(check['float32_error_torch'])} |"
      )


def print_loads(rows: list[dict], env: dict) -> None:
  """Prints the load average around each timing worker, if any was recorded."""
  loads = [
    f"{row['setting']} {row['timing']['load_average_start']:.1f} -> "
    f"{row['timing']['load_average_end']:.1f}"
    for row in rows
    if "load_average_end" in row["timing"]
  ]
  if loads:
    print(
      f"\nLoad average (1 min) at the start and end of each timing worker, for "
      f"{env.get('cpu_cores', '?')} cores (well above the core count = contended timings): "
      + "; ".join(loads)
    )


def write_json(path: str, env: dict, args, rows: list[dict]) -> None:
  """Writes the environment, the flags and every row to `path`."""
  with open(path, "w") as out:
    json.dump(
      {
        "environment": env,
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "results": rows,
      },
      out,
      indent=1,
    )
  print(f"\nwrote {path}")


def run_all(args) -> int:
  """Times every chosen setting and prints the tables; returns the exit status."""
  chosen = chosen_settings(args.settings)
  workers.log(
    f"settings: {', '.join(s.name for s in chosen)}; frameworks: "
    f"{', '.join(args.frameworks)}; {args.repeats} timed runs each"
  )
  rows, environments, status = [], [], 0
  for setting in chosen:
    row = run_setting(setting, args, environments)
    if row_failed(row):
      status = 1
    rows.append(row)
  env = environments[0] if environments else {}
  print_notes(env, args)
  for kind, title in (
    ("distill", "Distillation iteration (meta-gradient)"),
    ("expert", "Expert epoch"),
  ):
    kind_rows = [row for row in rows if row["kind"] == kind]
    if kind_rows:
      print(f"\n## {title}\n\n{table(kind_rows, kind)}")
  print_failures(rows)
  print_float64(rows)
  print_loads(rows, env)
  if args.json:
    write_json(args.json, env, args, rows)
  return status


def parse_args(argv=None) -> argparse.Namespace:
  """Command-line flags."""
  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="\n".join(__doc__.splitlines()[1:]),
  )
  parser.add_argument(
    "--settings", default="default", help="comma-separated names, 'default' or 'all' (see --list)"
  )
  parser.add_argument("--frameworks", default="jax,torch", help="jax, torch or jax,torch")
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per framework")
  parser.add_argument("--quick", action="store_true", help="1 timed run, no memory workers")
  parser.add_argument(
    "--no_memory", dest="memory", action="store_false", help="skip the peak-memory subprocesses"
  )
  parser.add_argument(
    "--float64_check",
    action="store_true",
    help="also run both sides in float64 (must agree) and report each "
    "side's float32 error against float64 (needs both frameworks)",
  )
  parser.add_argument("--conv_impl", default="auto", help="auto, lax, im2col or shift (JAX side)")
  parser.add_argument(
    "--unroll",
    default="1",
    help="JAX distillation: scan steps per loop iteration (a count or 'full')",
  )
  parser.add_argument(
    "--remat",
    default=settings_lib.base_config().distill.remat,
    help="JAX distillation: make_meta_loss's remat policy (default: the "
    "config default; none: not passed, for commits before remat existed)",
  )
  parser.add_argument("--torch_device", default="auto", help="auto, cpu or cuda")
  parser.add_argument(
    "--threads", type=int, default=0, help="torch intra-op threads (0: the CPU cores available)"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--loss_rtol", type=float, default=1e-4)
  parser.add_argument("--grad_rtol", type=float, default=1e-3)
  parser.add_argument(
    "--max_rss_gb",
    type=float,
    default=0.0,
    help="kill a worker above this resident size (0: 90%% of MemAvailable)",
  )
  parser.add_argument(
    "--timeout_s", type=float, default=4 * 3600.0, help="kill a worker running longer than this"
  )
  parser.add_argument("--json", default="", help="also write all results to this file")
  parser.add_argument("--list", action="store_true", help="list the settings and exit")
  parser.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  parser.add_argument("--_out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.frameworks = tuple(f.strip() for f in args.frameworks.split(",") if f.strip())
  if not args.frameworks or any(f not in FRAMEWORKS for f in args.frameworks):
    parser.error(f"--frameworks must name jax and/or torch, got {args.frameworks}")
  if args.quick:
    args.repeats, args.memory = 1, False
  if args.float64_check and len(args.frameworks) != 2:
    parser.error("--float64_check needs --frameworks jax,torch")
  if not args.max_rss_gb:
    args.max_rss_gb = 0.9 * memory_probe.available_kib() / 1024**2
  return args


def main(argv=None) -> int:
  """Lists the settings, runs one worker (--_worker) or runs them all; returns the exit status."""
  args = parse_args(argv)
  if args.list:
    for name, setting in all_settings().items():
      mark = "*" if name in DEFAULT_SETTINGS else " "
      print(f"{mark} {name:20} {setting.kind:8} {setting.describe()}")
    print("(* = in the default run)")
    return 0
  if args._worker:  # pylint: disable=protected-access
    (setting,) = chosen_settings(args.settings)
    if args._worker == "time":  # pylint: disable=protected-access
      result = workers.time_worker(setting, args)
    elif args._worker == "float64":  # pylint: disable=protected-access
      result = workers.float64_worker(setting, args)
    else:
      result = workers.memory_worker(setting, args.frameworks[0], args, args._out)  # pylint: disable=protected-access
    with open(args._out, "w") as out:  # pylint: disable=protected-access
      json.dump(result, out)
    return 0
  return run_all(args)


if __name__ == "__main__":
  sys.exit(main())
