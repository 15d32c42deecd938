r"""The stealth frontier: Acc_W against Acc of finished runs, each with its worst cleanser's AUC.

  python -m experiments.stealth_frontier --out runs/frontier \
      --run "appended, key e=runs/default_e" --run "clean_label eps 0.15, key 1=runs/cl_k1" ...

Each --run is LABEL=WORKDIR of a finished run of the package whose attacks stage ran the data
threats (attacks.json "data"). From it: the distilled set's Acc and Acc_W (with key-derived
queries, the key accuracy) over the evaluation seeds, how many seeds are verified, the clean
distilled set's Acc, and for every cleanser the ROC AUC a pirate gets without the key: of the
carriers against the rest of the set where some images are carriers (the "appended" and
"matching" embeddings), of the set's images against the clean distilled set's where every
image moved ("clean_label"); and the verdicts after it drops 10% / 30% / what it flags.

Writes <out>/stealth_frontier.json (every row), <out>/stealth_frontier.md (the table) and
<out>/stealth_frontier.png: the frontier (colour = the worst cleanser's AUC, 0.5 = blind) and,
per run, ten of its watermark-carrying images above the same slots of its clean distilled set.
Nothing goes into docs/: copy a figure there by hand.
"""

import argparse
import json
import pathlib

import numpy as np

from ccdd_jax.run import reporting
from ccdd_jax.run import workdir as workdir_lib

KEY_TRIGGERS = ("trigger_visibility",)  # The owner's own view (uses the key): not a cleanser.


def cleanser_aucs(data: dict, every_image_moved: bool) -> dict:
  """Per cleanser: the pirate's AUC (carriers vs the rest, or set vs clean set)."""
  field = "set_auc" if every_image_moved else "trigger_slots_auc"
  return {
    name: entry[field]
    for name, entry in data["detection"]["data"].items()
    if name not in KEY_TRIGGERS and entry.get(field) is not None
  }


def row(label: str, workdir: pathlib.Path) -> dict:
  """One run's figures (report.json, attacks.json, distill.json)."""
  report = reporting.read_json(workdir / "report.json")
  attacks = reporting.read_json(workdir / "attacks.json")
  if "data" not in attacks:
    raise SystemExit(f"{workdir}: no data threats in attacks.json (run --stage=attacks first)")
  distilled = report["distilled"]
  embedding = report["distill"]["distilled"].get("embedding", "matching")
  moved = embedding == "clean_label"
  aucs = cleanser_aucs(attacks["data"], moved)
  worst = max(aucs, key=lambda n: abs(aucs[n] - 0.5))
  after = {
    name: {drop: f"{e['verified']}/{e['networks']}" for drop, e in entry["after"].items()}
    for name, entry in attacks["data"]["cleansers"].items()
  }
  return {
    "label": label,
    "workdir": str(workdir),
    "embedding": embedding,
    "acc": distilled["acc"]["mean"],
    "acc_std": distilled["acc"]["std"],
    "acc_w": distilled["acc_w"]["mean"],
    "acc_w_std": distilled["acc_w"]["std"],
    "verified": int(sum(distilled["verified"])),
    "seeds": len(distilled["verified"]),
    "clean_acc": report["clean_distilled"]["acc"]["mean"],
    "num_images": report["distill"]["distilled"]["num_images"],
    "aucs": aucs,
    "worst_cleanser": worst,
    "worst_auc": aucs[worst],
    "after_drops": after,
  }


def table(rows: list[dict]) -> str:
  """The markdown table of the rows."""
  lines = [
    "| run | embedding | images | Acc | Acc_W / key acc | verified | clean set Acc | worst "
    "cleanser (AUC) | its verdicts after dropping 10% / 30% / flagged |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    drops = r["after_drops"].get(r["worst_cleanser"], {})
    verdicts = " / ".join(drops.get(k, "–") for k in ("top 10%", "top 30%", "flagged"))
    lines.append(
      f"| {r['label']} | {r['embedding']} | {r['num_images']} | {100 * r['acc']:.1f} ± "
      f"{100 * r['acc_std']:.1f} | {100 * r['acc_w']:.1f} ± {100 * r['acc_w_std']:.1f} | "
      f"{r['verified']}/{r['seeds']} | {100 * r['clean_acc']:.1f} | {r['worst_cleanser']} "
      f"({r['worst_auc']:.2f}) | {verdicts} |"
    )
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: pathlib.Path) -> None:
  """The frontier beside each run's carriers and its clean set's same slots."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig = plt.figure(figsize=(13, 1.2 + 1.25 * max(len(rows), 4)))
  grid = fig.add_gridspec(len(rows) * 2, 2, width_ratios=(1.0, 1.25))
  ax = fig.add_subplot(grid[:, 0])
  points = ax.scatter(
    [100 * r["acc"] for r in rows],
    [100 * r["acc_w"] for r in rows],
    c=[r["worst_auc"] for r in rows],
    cmap="RdYlGn_r",
    vmin=0.5,
    vmax=1.0,
    s=80,
    edgecolors="k",
  )
  for r in rows:
    ax.annotate(
      f"{r['label']}\n{r['verified']}/{r['seeds']} verified, AUC {r['worst_auc']:.2f}",
      (100 * r["acc"], 100 * r["acc_w"]),
      fontsize=7,
      xytext=(4, 4),
      textcoords="offset points",
    )
  fig.colorbar(points, ax=ax, label="worst cleanser's AUC (0.5: blind)")
  ax.set_xlabel("Acc (%)")
  ax.set_ylabel("Acc_W, or key accuracy for key-derived queries (%)")
  ax.set_title("Digits: watermark against accuracy")
  for i, r in enumerate(rows):
    wm = workdir_lib.load_distilled(pathlib.Path(r["workdir"]), "distilled")
    clean = workdir_lib.load_distilled(pathlib.Path(r["workdir"]), "clean_distilled")
    carriers = np.flatnonzero(np.asarray(wm["from_trigger"], bool))[:10]
    pairs = (("carriers", wm["pixels"][carriers]), ("clean set", None))
    for j, (name, images) in enumerate(pairs):
      if images is None:  # The clean set's same slots (appended carriers: its first images).
        slots = carriers if len(clean["labels"]) > carriers.max() else np.arange(10)
        images = clean["pixels"][slots]
      sub = fig.add_subplot(grid[2 * i + j, 1])
      strip = np.concatenate(list(images[:10]), axis=1)
      sub.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=1)
      sub.set_xticks([])
      sub.set_yticks([])
      sub.set_ylabel(f"{r['label'][:18]}\n{name}", fontsize=6, rotation=0, ha="right", va="center")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None):
  """Reads the runs, writes the JSON, the table and the plot."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", action="append", required=True, help="LABEL=WORKDIR (repeat)")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  rows = []
  for spec in args.run:
    label, sep, workdir = spec.rpartition("=")
    if not sep:
      raise SystemExit(f"--run {spec!r}: use LABEL=WORKDIR")
    rows.append(row(label, pathlib.Path(workdir)))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "stealth_frontier.json").write_text(json.dumps(rows, indent=1))
  (out / "stealth_frontier.md").write_text(table(rows))
  plot(rows, out / "stealth_frontier.png")
  print(table(rows))


if __name__ == "__main__":
  main()
