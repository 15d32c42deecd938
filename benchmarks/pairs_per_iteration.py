r"""Several trajectory pairs per iteration: time per pair, and Acc at equal pairs seen (digits).

  python benchmarks/pairs_per_iteration.py --dir /tmp/pairs --key_file /work/baseline/fixed.key
  python benchmarks/pairs_per_iteration.py --dir D --key_file K --skip_acc   # the speed only

On configs/digits.py (the default: the clean set, IPC 10, N = 20 student steps over all 100
images, over 8 clean experts):

  speed  distill.distill in this process over the experts of `--dir`/base, with
         distill.pairs_per_iteration = 1, 2, 4: the median seconds per iteration after
         the first (compilation), the fastest of `--repeats` interleaved rounds; per
         pair, and its ratio to one pair.
  Acc    the CLI (`python -m ccdd_jax.main`) on copies of the same experts: `--stage distill`
         then `--stage evaluate` with 1 pair x `--iterations` iterations and 4 pairs x
         `--iterations` / 4 (equal pairs seen); evaluation.json's Acc (mean +- std over the
         config's 5 evaluation seeds) of the clean distilled set and, for the watermarked
         set (its carriers appended), Acc and Acc_W.

The experts are trained once (`--stage keygen`, `queries`, `experts` into `--dir`/base) with
the key `--key_file`, so every variant matches the same trajectories.
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time

import jax
import numpy as np

from ccdd_jax.config import loader
from ccdd_jax.method import distill
from ccdd_jax.method import models
from ccdd_jax.method import trajectory_pairs
from ccdd_jax.run import checkpoints

CONFIG = "digits"


def cli(workdir: pathlib.Path, stage: str, key_file: str, *overrides: str) -> float:
  """Runs one stage of the pipeline in a subprocess; its wall time in seconds."""
  command = [sys.executable, "-m", "ccdd_jax.main", f"--workdir={workdir}", f"--stage={stage}"]
  command += [f"--config={CONFIG}", f"--key_file={key_file}", *overrides]
  start = time.perf_counter()
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode:
    sys.exit(f"{' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
  return time.perf_counter() - start


def train_experts(base: pathlib.Path, key_file: str) -> None:
  """The key's experts of the digits config in `base` (resumed where they are)."""
  for stage in ("keygen", "queries", "experts"):
    cli(base, stage, key_file)


def speed(base: pathlib.Path, pairs_list: list[int], iterations: int, repeats: int) -> dict:
  """Seconds per iteration and per pair of distill.distill for each pairs_per_iteration: the
  fastest of `repeats` rounds over `pairs_list` (interleaved, so a busy spell hits all)."""
  config = loader.load(CONFIG)
  num_classes, shape = 10, (8, 8, 1)
  net = models.build_network(config.model.name, num_classes, shape, config.model)
  epochs = trajectory_pairs.trajectory_epochs(config.distill)
  root = base / "trajectories"
  expert = checkpoints.load_flat_trajectories(root, "clean", net.like_params(), epochs)
  num = config.distill.ipc * num_classes
  images = np.random.default_rng(0).standard_normal((num, *shape)).astype(np.float32)
  labels = np.arange(num) % num_classes
  out = {}
  for pairs in pairs_list * repeats:
    cfg = loader.load(CONFIG).distill
    cfg.pairs_per_iteration, cfg.iterations = pairs, iterations + 1
    stamps = []
    progress = lambda it, loss, s=stamps: s.append((time.perf_counter(), float(loss)))
    args = (net.apply_flat, config.dsa, images, labels, (expert, expert))
    distill.distill(cfg, *args, jax.random.PRNGKey(0), progress)
    per_iteration = float(np.median(np.diff([t for t, _ in stamps])))
    if pairs not in out or per_iteration < out[pairs]["s_per_iteration"]:
      out[pairs] = {"s_per_iteration": per_iteration, "s_per_pair": per_iteration / pairs}
  return out


def accuracy(base: pathlib.Path, dir_: pathlib.Path, key_file: str, variants: list) -> dict:
  """Acc of the sets distilled with (pairs, iterations) each, on copies of `base`'s experts."""
  out = {}
  for pairs, iterations in variants:
    name = f"{pairs} pair{'s' * (pairs > 1)} x {iterations}"
    workdir = dir_ / f"pairs{pairs}_it{iterations}"
    if not (workdir / "evaluation.json").is_file():
      shutil.rmtree(workdir, ignore_errors=True)
      shutil.copytree(base, workdir)
      overrides = (
        f"--config.distill.pairs_per_iteration={pairs}",
        f"--config.distill.iterations={iterations}",
      )
      cli(workdir, "distill", key_file, *overrides)
      cli(workdir, "evaluate", key_file, *overrides)
    evaluation = json.loads((workdir / "evaluation.json").read_text())["convnet"]
    distilled = json.loads((workdir / "distill.json").read_text())["clean_distilled"]
    out[name] = {
      "pairs_seen": pairs * iterations,
      "distill_seconds": distilled["seconds"],
      "clean_acc": evaluation["clean_distilled"]["acc"],
      "acc": evaluation["distilled"]["acc"],
      "acc_w": evaluation["distilled"]["acc_w"],
      "lr": distilled["lr"],
    }
  return out


def report(speeds: dict, accs: dict) -> str:
  """Both tables, side by side."""
  lines = ["| pairs per iteration | " + " | ".join(map(str, speeds)) + " |"]
  lines.append("|---" * (len(speeds) + 1) + "|")
  one = speeds[min(speeds)]["s_per_pair"]
  for label, cell in (
    ("s / iteration", lambda s: f"{s['s_per_iteration']:.3f}"),
    ("s / pair", lambda s: f"{s['s_per_pair']:.3f}"),
    ("time per pair vs 1 pair", lambda s: f"{s['s_per_pair'] / one:.2f}x"),
  ):
    lines.append(f"| {label} | " + " | ".join(cell(s) for s in speeds.values()) + " |")
  if accs:
    pct = lambda d: f"{100 * d['mean']:.1f} ± {100 * d['std']:.1f}"
    lines += ["", "| | " + " | ".join(accs) + " |", "|---" * (len(accs) + 1) + "|"]
    for label, cell in (
      ("pairs seen", lambda a: str(a["pairs_seen"])),
      ("clean distilled set: Acc %", lambda a: pct(a["clean_acc"])),
      ("watermarked set: Acc %", lambda a: pct(a["acc"])),
      ("watermarked set: Acc_W %", lambda a: pct(a["acc_w"])),
      ("learned lr", lambda a: f"{a['lr']:.4f}"),
      ("distillation, s", lambda a: f"{a['distill_seconds']:.0f}"),
    ):
      lines.append(f"| {label} | " + " | ".join(cell(a) for a in accs.values()) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", required=True)
  parser.add_argument("--key_file", required=True)
  parser.add_argument("--pairs", default="1,2,4", help="pairs per iteration timed")
  parser.add_argument("--speed_iterations", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=2, help="rounds of the timed pairs")
  parser.add_argument("--iterations", type=int, default=600, help="N of 1 pair x N")
  parser.add_argument("--skip_acc", action="store_true")
  args = parser.parse_args()
  dir_ = pathlib.Path(args.dir)
  base = dir_ / "base"
  train_experts(base, args.key_file)
  pairs_list = [int(p) for p in args.pairs.split(",")]
  speeds = speed(base, pairs_list, args.speed_iterations, args.repeats)
  n = args.iterations
  accs = {} if args.skip_acc else accuracy(base, dir_, args.key_file, [(1, n), (4, n // 4)])
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
  print(f"jax {jax.__version__}, {jax.default_backend()}; config {CONFIG}")
  print(report(speeds, accs))
  (dir_ / "results.json").write_text(json.dumps({"speed": speeds, "acc": accs}, indent=2) + "\n")


if __name__ == "__main__":
  main()
