r"""Sweeps the watermark's weight (lambda1 of eq. 6, beta of eq. 10, or the carriers
per pattern of the "appended" embedding) and tabulates Acc against Acc_W, as a
markdown table and a plot.

  python -m experiments.tradeoff --config configs/digits_matching.py --root runs/tradeoff \
      --lambda1 0,0.25,0.5,1,2,4 --beta 0,0.25,0.5,1,2 [--set distill.iterations=200]
  python -m experiments.tradeoff --config configs/digits.py --root runs/tradeoff_carriers \
      --lambda1 "" --beta "" --carriers 1,3,5,7,9

Every run uses one key (<root>/owner.key). The lambda1 sweep trains experts
for each value (everything else from the config); the beta and carriers
sweeps reuse the experts of the config's own lambda1 (trained once under
<root>/experts_base) and rerun distillation, evaluation and verification
for each value.
Writes <root>/tradeoff.md, <root>/tradeoff.json and <root>/tradeoff.png after
every run; nothing goes into docs/ (copy a figure there by hand).
"""

import argparse
import json
import os
import pathlib
import shutil
import sys

import numpy as np

from ccdd_jax.config import loader as config_loader
from ccdd_jax.run import pipeline
from ccdd_jax.run import reporting

# The sweeps over one set of experts: sweep name -> its distill field.
SHARED_EXPERT_FIELDS = {"beta": "beta", "carriers": "carriers_per_pattern"}
# Legend labels of the sweeps in the plot.
SWEEP_LABELS = {"lambda1": "λ1 (eq. 6)", "beta": "β (eq. 10)", "carriers": "carriers per pattern"}


def row(name: str, value: float, report: dict) -> dict:
  """One table row from a run's report."""
  d = report["distilled"]
  return {
    "sweep": name,
    "value": value,
    "acc": d["acc"],
    "acc_w": d["acc_w"],
    "verified": sum(d["verified"]),
    "seeds": len(d["verified"]),
    "median_p": float(np.median(d["p_values"])),
    "expert_acc": report["experts"].get("watermarked", {}).get("acc", {}).get("mean"),
    "expert_acc_w": report["experts"].get("watermarked", {}).get("acc_w", {}).get("mean"),
    "clean_acc": report["clean_distilled"]["acc"]["mean"],
    "num_images": report.get("distill", {}).get("distilled", {}).get("num_images"),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--root", required=True)
  parser.add_argument("--lambda1", default="0,0.25,0.5,1,2,4")
  parser.add_argument("--beta", default="0,0.25,0.5,1,2")
  parser.add_argument("--carriers", default="", help="distill.carriers_per_pattern values")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    help="config override field=value, read as --config.field=value (e.g. distill.iterations=200)",
  )
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  key_file = str(root / "owner.key")
  rows = []

  for value in [float(v) for v in args.lambda1.split(",") if v]:
    config = config_loader.load(args.config, args.set)
    config.experts.lambda1 = value
    workdir = root / f"lambda1_{value:g}"
    print(f"== lambda1 = {value:g} -> {workdir}", file=sys.stderr, flush=True)
    rows.append(row("lambda1", value, pipeline.run(config, str(workdir), "all", key_file)))
    write_outputs(root, rows)

  config = config_loader.load(args.config, args.set)
  base = root / "experts_base"
  if not (base / "experts.json").is_file():
    pipeline.run(config, str(base), "keygen", key_file)
    pipeline.run(config, str(base), "experts", key_file)
  shared = [("beta", float(v)) for v in args.beta.split(",") if v]
  shared += [("carriers", int(v)) for v in args.carriers.split(",") if v]
  for sweep, value in shared:
    config = config_loader.load(args.config, args.set)
    config.distill[SHARED_EXPERT_FIELDS[sweep]] = value
    workdir = root / f"{sweep}_{value:g}"
    print(f"== {sweep} = {value:g} -> {workdir}", file=sys.stderr, flush=True)
    workdir.mkdir(exist_ok=True)
    if not (workdir / "trajectories").exists():
      os.symlink((base / "trajectories").resolve(), workdir / "trajectories")
    shutil.copy(base / "experts.json", workdir / "experts.json")
    for stage in ("distill", "evaluate"):
      pipeline.run(config, str(workdir), stage, key_file)
    rows.append(row(sweep, value, pipeline.run(config, str(workdir), "verify", key_file)))
    write_outputs(root, rows)


def write_outputs(root: pathlib.Path, rows: list) -> None:
  """tradeoff.json, tradeoff.md (table) and tradeoff.png (Acc vs Acc_W)."""
  (root / "tradeoff.json").write_text(json.dumps(rows, indent=2) + "\n")
  lines = [
    "| sweep | value | images | Acc | Acc_W | verified | median p | wm expert Acc / Acc_W | "
    "clean distilled Acc |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    expert = (
      f"{100 * r['expert_acc']:.1f} / {100 * r['expert_acc_w']:.1f}"
      if r["expert_acc"] is not None
      else "–"
    )
    lines.append(
      f"| {r['sweep']} | {r['value']:g} | {r.get('num_images', '–')} | "
      f"{reporting.fmt_pct(r['acc'])} | "
      f"{reporting.fmt_pct(r['acc_w'])} | {r['verified']}/{r['seeds']} | "
      f"{r['median_p']:.2g} | {expert} | {100 * r['clean_acc']:.1f}% |"
    )
  (root / "tradeoff.md").write_text("\n".join(lines) + "\n")
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5.5, 4))
  for sweep, marker in (("lambda1", "o"), ("beta", "s"), ("carriers", "D")):
    pts = [r for r in rows if r["sweep"] == sweep]
    if not pts:
      continue
    x = [100 * r["acc_w"]["mean"] for r in pts]
    y = [100 * r["acc"]["mean"] for r in pts]
    ax.errorbar(
      x,
      y,
      xerr=[100 * r["acc_w"]["std"] for r in pts],
      yerr=[100 * r["acc"]["std"] for r in pts],
      marker=marker,
      capsize=2,
      label=SWEEP_LABELS[sweep],
    )
    for r, xi, yi in zip(pts, x, y):
      ax.annotate(
        f"{r['value']:g}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7
      )
  ax.set_xlabel("Acc_W of networks trained on the distilled set (%)")
  ax.set_ylabel("Acc on the test split (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(root / "tradeoff.png", dpi=120)
  plt.close(fig)


if __name__ == "__main__":
  main()
