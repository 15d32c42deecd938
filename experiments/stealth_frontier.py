r"""The stealth frontier: Acc_W against Acc of finished runs, each with its worst cleanser's AUC.

  python -m experiments.stealth_frontier --out runs/frontier \
      --run "appended, key e=runs/default_e" --run "clean_label eps 0.15, key 1=runs/cl_k1" ...
  python -m experiments.stealth_frontier --out runs/frontier --ablation runs/frontier_k1

Each --ablation is the root of `python -m experiments.ablation ... --attacks`: every finished
variant under it becomes a run labelled "<variant> (<root's name>)".

Each --run is LABEL=WORKDIR of a finished run of the package. From it: the distilled set's Acc
and Acc_W (with key-derived queries, the key accuracy) over the evaluation seeds, how many seeds
are verified, the clean distilled set's Acc; and, where its attacks stage ran the data threats
(attacks.json "data"; else the point is grey), for every cleanser the ROC AUC a pirate gets
without the key: of the carriers against the rest of the set where some images are carriers
(the "appended" and "matching" embeddings), of the set's images against the clean distilled
set's where every image moved ("clean_label"); and the verdicts after it drops 10% / 30% / what
it flags.

Writes <out>/stealth_frontier.json (every row), <out>/stealth_frontier.md (the table) and
<out>/stealth_frontier.png: the frontier (colour = the worst cleanser's AUC, 0.5 = blind) and,
for the first --pictures runs, ten of their watermark-carrying images (one per label where
it can) above the clean distilled set's same slots, or its images of the same labels.
Nothing goes into docs/: copy a figure there by hand.
"""

import argparse
import collections
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
  distilled = report["distilled"]
  embedding = report["distill"]["distilled"].get("embedding", "matching")
  data = attacks.get("data")  # None: the attacks stage has not run (no AUC on the plot).
  aucs = cleanser_aucs(data, embedding == "clean_label") if data else {}
  worst = max(aucs, key=lambda n: abs(aucs[n] - 0.5)) if aucs else None
  after = {
    name: {drop: f"{e['verified']}/{e['networks']}" for drop, e in entry["after"].items()}
    for name, entry in (data["cleansers"] if data else {}).items()
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
    "worst_auc": aucs[worst] if worst else None,
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
    worst = f"{r['worst_cleanser']} ({r['worst_auc']:.2f})" if r["worst_cleanser"] else "–"
    lines.append(
      f"| {r['label']} | {r['embedding']} | {r['num_images']} | {100 * r['acc']:.1f} ± "
      f"{100 * r['acc_std']:.1f} | {100 * r['acc_w']:.1f} ± {100 * r['acc_w_std']:.1f} | "
      f"{r['verified']}/{r['seeds']} | {100 * r['clean_acc']:.1f} | {worst} | {verdicts} |"
    )
  return "\n".join(lines) + "\n"


def pick_carriers(wm: dict, clean: dict) -> tuple[np.ndarray, np.ndarray]:
  """Up to 10 carriers, one per label where possible, and the clean set's matching images: the
  same slot where the set is the clean one moved, else the clean set's next unused image of
  that label (a label shown twice shows two different clean images)."""
  carriers = np.flatnonzero(np.asarray(wm["from_trigger"], bool))
  labels = np.asarray(wm["labels"])[carriers]
  _, first = np.unique(labels, return_index=True)
  chosen = carriers[np.sort(first)][:10]
  if len(chosen) < 10:
    chosen = np.r_[chosen, np.setdiff1d(carriers, chosen)[: 10 - len(chosen)]]
  clean_labels = np.asarray(clean["labels"])
  same, used = [], collections.Counter()
  for k in chosen:
    if k < len(clean_labels):
      same.append(int(k))
      continue
    label = int(wm["labels"][k])
    of_label = np.flatnonzero(clean_labels == label)
    same.append(int(of_label[used[label] % len(of_label)]))
    used[label] += 1
  return chosen, np.asarray(same)


def plot(rows: list[dict], path: pathlib.Path, pictures: int, title: str) -> None:
  """The frontier beside the first `pictures` runs' carriers and their clean sets' images."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  shown = rows[:pictures]
  fig = plt.figure(figsize=(13, 2.5 + 0.15 * len(rows) + 1.25 * max(len(shown), 4)))
  grid = fig.add_gridspec(max(len(shown), 1) * 2, 2, width_ratios=(1.0, 1.25))
  ax = fig.add_subplot(grid[:, 0])
  points = ax.scatter(
    [100 * r["acc"] for r in rows],
    [100 * r["acc_w"] for r in rows],
    c=[np.nan if r["worst_auc"] is None else r["worst_auc"] for r in rows],
    plotnonfinite=True,
    cmap="RdYlGn_r",
    vmin=0.5,
    vmax=1.0,
    s=80,
    edgecolors="k",
  )
  points.cmap.set_bad("lightgrey")  # Grey: no attacks stage, so no AUC.
  for number, r in enumerate(rows, 1):  # Numbered points; the key below the axes.
    ax.annotate(
      str(number), (100 * r["acc"], 100 * r["acc_w"]), fontsize=8, xytext=(5, 3),
      textcoords="offset points",
    )  # fmt: skip
  key = [
    f"{n}. {r['label']}: {r['verified']}/{r['seeds']} verified, "
    + ("no AUC" if r["worst_auc"] is None else f"AUC {r['worst_auc']:.2f}")
    for n, r in enumerate(rows, 1)
  ]
  ax.text(0.0, -0.12, "\n".join(key), transform=ax.transAxes, fontsize=7, va="top")
  fig.colorbar(points, ax=ax, label="worst cleanser's AUC (0.5: blind)")
  ax.set_xlabel("Acc (%)")
  ax.set_ylabel("Acc_W, or key accuracy for key-derived queries (%)")
  ax.set_title(title)
  ax.margins(0.3)
  for i, r in enumerate(shown):
    wm = workdir_lib.load_distilled(pathlib.Path(r["workdir"]), "distilled")
    clean = workdir_lib.load_distilled(pathlib.Path(r["workdir"]), "clean_distilled")
    carriers, same = pick_carriers(wm, clean)
    moved_slots = r["embedding"] == "clean_label"
    below = "clean set, same slots" if moved_slots else "clean set, carriers' labels"
    pairs = (("carriers", wm["pixels"][carriers]), (below, clean["pixels"][same]))
    for j, (name, images) in enumerate(pairs):
      sub = fig.add_subplot(grid[2 * i + j, 1])
      strip = np.concatenate(list(images[:10]), axis=1)
      sub.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=1)
      sub.set_xticks([])
      sub.set_yticks([])
      title = f"{r['label']}: {name} (labels {' '.join(map(str, wm['labels'][carriers]))})"
      sub.set_title(title, fontsize=7, loc="left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def runs(specs: list[str], ablation_roots: list[str]) -> list[tuple[str, pathlib.Path]]:
  """(label, workdir) of each --run LABEL=WORKDIR, then of each finished variant of each
  --ablation root, labelled "<variant> (<root's name>)"."""
  found = []
  for spec in specs:
    label, sep, workdir = spec.rpartition("=")
    if not sep:
      raise SystemExit(f"--run {spec!r}: use LABEL=WORKDIR")
    found.append((label, pathlib.Path(workdir)))
  for root in map(pathlib.Path, ablation_roots):
    variants = sorted(path.parent for path in root.glob("*/ablation.json"))
    if not variants:
      raise SystemExit(f"--ablation {root}: no finished variant (<root>/<variant>/ablation.json)")
    found += [(f"{workdir.name} ({root.name})", workdir) for workdir in variants]
  if not found:
    raise SystemExit("give runs: --run LABEL=WORKDIR or --ablation ROOT")
  return found


def main(argv=None):
  """Reads the runs, writes the JSON, the table and the plot."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--run", action="append", default=[], help="LABEL=WORKDIR (repeat)")
  p.add_argument(
    "--ablation",
    action="append",
    default=[],
    help="ROOT of experiments.ablation: each finished variant, labelled by its name (repeat)",
  )
  p.add_argument("--out", required=True)
  p.add_argument("--pictures", type=int, default=3, help="Runs whose images are shown (first).")
  p.add_argument("--title", default="Digits: watermark against accuracy", help="The plot's title.")
  args = p.parse_args(argv)
  rows = [row(label, workdir) for label, workdir in runs(args.run, args.ablation)]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "stealth_frontier.json").write_text(json.dumps(rows, indent=1))
  (out / "stealth_frontier.md").write_text(table(rows))
  plot(rows, out / "stealth_frontier.png", args.pictures, args.title)
  print(table(rows))


if __name__ == "__main__":
  main()
