r"""The ablation of the watermarked distillation's levers, alone and together, in one table.

  python -m experiments.ablation                                  # digits, every variant
  python -m experiments.ablation --variants default,paper --iterations_scale 0.5
  python -m experiments.ablation --setting cifar10_cpu            # configs/cifar10_cpu_paper.py
  python -m experiments.ablation --list                           # the variants and their fields
  python -m experiments.ablation --variants clean_label,clean_label_eps010 --attacks \
      --root runs/frontier_k1                                     # a frontier's runs, one key

Every variant (experiments/variants.py) runs the pipeline's own stages
(`pipeline.run`) in <root>/<variant>/ with one key (<root>/owner.key) and
`--eval_seeds` evaluation seeds (5). Variants whose expert fields agree (the
fields that stages.py's table gives to experts and the stages before it) share one
expert training, <root>/experts_<fingerprint>/: the variant's workdir links
its trajectories and starts from that workdir's manifest, so `manifest.check`
refuses the reuse if an expert field differed. A variant whose <root>/<variant>/
ablation.json exists is finished and skipped; an interrupted one resumes
(the stages resume). Each variant also distils and evaluates a clean set and
the real-data baseline (the pipeline always does); the table's "clean
distilled" and "real data" rows are the paper variant's.

Every variant derives from the setting's paper-literal config (digits:
configs/digits_paper.py; cifar10_cpu: configs/cifar10_cpu_paper.py) by the
fields it lists; "default" is the setting's default config (digits:
configs/digits.py; cifar10_cpu: configs/cifar10_cpu.py; each is its
paper-literal config plus `variants.DEFAULT_LEVERS`). The default runs its own
`distill.iterations`; the other variants run their embedding's base length
(`variants.VARIANT_ITERATIONS`) times their own factor; all times
`--iterations_scale`. A variant whose expert kinds (an appended one needs clean
experts only) are not all in its shared expert workdir runs the experts stage
there first (it resumes: only the missing kinds train).

Writes, under the root (default runs/ablation_<setting>), after every variant:
ablation.json (the rows), ablation.md (how it was made and the table) and
ablation_<setting>[_<tag>].png (Acc against Acc_W); `--tag` names the plot and
the table's heading. Nothing is written outside the root: copy a figure into
docs/ by hand.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.log import log
from ccdd_jax.method import embedding as embedding_lib
from ccdd_jax.run import manifest
from ccdd_jax.run import pipeline
from ccdd_jax.run import reporting
from experiments import ablation_report
from experiments import variants

REPO = variants.REPO


def experts_group(config: ml_collections.ConfigDict) -> str:
  """A tag shared by the configs whose experts (and everything before them) are the same."""
  return manifest.fingerprint(manifest.record(config, "ablation", 0), "experts")


def _read_back(name: str, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """The finished variant's row, or {}; raises if its workdir was made with another config."""
  done = reporting.read_json(workdir / "ablation.json")
  if not done:
    return {}
  old = reporting.read_json(workdir / "manifest.json").get("fields", {})
  changed = manifest.differing(old, manifest.record(config, old.get("key"), old.get("num_classes")))
  if changed:
    raise CCDDError(f"{workdir} was made with other values of {', '.join(changed)}: remove it")
  log(f"== {name}: finished earlier ({workdir / 'ablation.json'})")
  return dict(done, variant=name)


def _link_experts(
  name: str, config: ml_collections.ConfigDict, root: pathlib.Path, key_file: pathlib.Path
) -> None:
  """Trains the variant's missing expert kinds in its shared workdir and links them in."""
  base = root / f"experts_{experts_group(config)}"
  trained = reporting.read_json(base / "experts.json")
  if not all(kind in trained for kind in embedding_lib.expert_kinds(config.distill)):
    log(f"== {name}: training experts in {base}")  # Kinds already there resume.
    pipeline.run(config, str(base), "keygen", str(key_file))
    pipeline.run(config, str(base), "experts", str(key_file))
  workdir = root / name
  workdir.mkdir(parents=True, exist_ok=True)
  if not (workdir / "trajectories").exists():
    (workdir / "trajectories").symlink_to((base / "trajectories").resolve())
  for file in ("experts.json", "manifest.json"):
    if not (workdir / file).exists():
      reporting.write_text(workdir / file, (base / file).read_text())


def run_variant(
  name: str,
  config: ml_collections.ConfigDict,
  root: pathlib.Path,
  key_file: pathlib.Path,
  attacks: bool = False,
) -> dict:
  """Runs, resumes or reads back one variant; returns its row (also <root>/<name>/ablation.json).

  `attacks`: also its attacks stage (the cleansers that experiments/stealth_frontier.py reads).
  """
  workdir = root / name
  done = _read_back(name, config, workdir)
  if done:  # Read back only if the workdir was made with this very config.
    if attacks and not (workdir / "attacks.json").exists():
      pipeline.run(config, str(workdir), "attacks", str(key_file))
    return done
  _link_experts(name, config, root, key_file)
  log(f"== {name}: {config.distill.iterations} iterations -> {workdir}")
  start = time.time()
  for stage in ("distill", "evaluate"):
    pipeline.run(config, str(workdir), stage, str(key_file))
  report = pipeline.run(config, str(workdir), "verify", str(key_file))
  result = row(name, config, report, time.time() - start)
  if attacks:
    pipeline.run(config, str(workdir), "attacks", str(key_file))
  reporting.write_json(workdir / "ablation.json", result)
  return result


def _set_row(entry: dict) -> dict:
  return {
    "acc": entry["acc"],
    "acc_w": entry["acc_w"],
    "verified": int(sum(entry["verified"])),
    "seeds": len(entry["verified"]),
    "median_p": float(np.median(entry["p_values"])),
  }


def row(name: str, config: ml_collections.ConfigDict, report: dict, seconds: float) -> dict:
  """The table's figures of one variant from its report (and its clean / real baselines)."""
  d = report["distill"]["distilled"]
  terms = ("loss", "expert_term", "twin_term", "direct_term")
  variant = variants.BY_NAME.get(name)
  return {
    "variant": name,
    "label": variant.label if variant else name,
    "iterations": config.distill.iterations,
    "num_images": d["num_images"],
    "visibility": d["trigger_visibility"]["mean"],
    **{f"{t}_{w}": d[f"{t}_{w}"] for t in terms for w in ("first", "last")},
    "distill_seconds": d["seconds"],
    "seconds": seconds,
    "experts_seconds": report["experts"].get("seconds", 0.0),
    **_set_row(report["distilled"]),
    "clean_distilled": _set_row(report["clean_distilled"]),
    "real": _set_row(report["real"]),
    "fields": dict(variant.fields or {}) if variant else {},
  }


def _commit() -> str:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _meta(args: argparse.Namespace, argv, key_file: pathlib.Path) -> dict:
  """How the table was made: command, commit, machine, key and lengths."""
  from ccdd_jax.method import watermark  # pylint: disable=g-import-not-at-top

  return {
    "command": "python -m experiments.ablation "
    + " ".join(argv if argv is not None else sys.argv[1:]),
    "commit": _commit(),
    "date": datetime.date.today().isoformat(),
    "machine": f"{os.cpu_count()}-core {platform.machine()} ({jax.default_backend()})",
    "python": platform.python_version(),
    "jax": jax.__version__,
    "key": watermark.key_fingerprint(watermark.read_key_file(key_file)),
    "eval_seeds": args.eval_seeds,
    "default_iterations": variants.default_config(args.setting, args.set).distill.iterations,
    "variant_iterations": ", ".join(
      f"{e} {n}" for (s, e), n in variants.VARIANT_ITERATIONS.items() if s == args.setting
    ),
    "iterations_scale": args.iterations_scale,
  }


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--setting", default="digits", choices=sorted(variants.SETTINGS))
  parser.add_argument(
    "--root", default="", help="workdirs and outputs (default runs/ablation_<setting>)"
  )
  parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
  parser.add_argument("--iterations_scale", type=float, default=1.0)
  parser.add_argument("--eval_seeds", type=int, default=5)
  parser.add_argument(
    "--tag", default="", help="names the plot (ablation_<setting>_<tag>.png) and the heading"
  )
  parser.add_argument("--set", action="append", default=[], help="field=value for every variant")
  parser.add_argument(
    "--attacks", action="store_true", help="also run each variant's attacks stage (cleansers)"
  )
  parser.add_argument("--list", action="store_true", help="print the variants and exit")
  return parser


def main(argv=None):
  parser = _parser()
  args = parser.parse_args(argv)
  names = [n for n in args.variants.split(",") if n] or [v.name for v in variants.VARIANTS]
  unknown = [n for n in names if n not in variants.BY_NAME]
  if unknown:
    parser.error(f"unknown variants {unknown}: use some of {', '.join(variants.BY_NAME)}")
  configs = {
    n: variants.variant_config(
      args.setting, variants.BY_NAME[n], args.iterations_scale, args.eval_seeds, args.set
    )
    for n in names
  }  # All validated before any work.
  if args.list:
    for n in names:
      print(f"{n:32s} {configs[n].distill.iterations:5d} its  {variants.BY_NAME[n].fields}")
    return
  root = pathlib.Path(args.root or REPO / "runs" / f"ablation_{args.setting}")
  root.mkdir(parents=True, exist_ok=True)
  key_file = root / "owner.key"
  rows = []
  for n in names:
    rows.append(run_variant(n, configs[n], root, key_file, args.attacks))
    reporting.write_json(root / "ablation.json", rows)
    ablation_report.write(root, args.setting, rows, _meta(args, argv, key_file), args.tag)
  print(json.dumps([{k: r[k] for k in ("variant", "acc", "acc_w", "verified")} for r in rows]))


if __name__ == "__main__":
  main()
