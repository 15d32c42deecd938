"""What --stage=attacks leaves in the workdir: attacks.json and its two pictures.

  attacks.json       threats.suite.run_suite's result (`write_attacks`)
  attacks.png        the model attacks: Acc and Acc_W against strength (`save_attacks_plot`)
  attacks_data.png   the attacks on the data and the detectors (`save_data_threats_plot`)

Its tables in report.md are reporting.attacks_markdown's.
"""

import pathlib

import numpy as np

from ccdd_jax.run import reporting


def save_attacks_plot(path: pathlib.Path, attacks: dict) -> None:
  """attacks.png: Acc (solid) and Acc_W (dashed) against strength, one panel per attack.

  One colour per set; the first point of each panel is the unattacked
  network; filled markers where most networks are still verified.
  """
  from matplotlib.figure import Figure  # Imported on first use: it is slow to import.

  names = list(attacks["attacks"])
  cols = min(5, max(1, len(names)))
  rows = -(-len(names) // cols)
  fig = Figure(figsize=(3.2 * cols, 2.8 * rows + 0.6))
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  colors = {"distilled": "tab:red", "clean_distilled": "tab:blue", "real": "tab:green"}
  for ax, name in zip(axes, names):
    strength = attacks["attacks"][name]["strength"]
    for set_name, points in attacks["sets"].items():
      entries = [points["before"], *points.get(name, [])]
      x = np.arange(len(entries))
      color = colors.get(set_name, "tab:gray")
      for metric, style in (("acc", "-"), ("acc_w", "--")):
        y = [100 * e[metric]["mean"] for e in entries]
        ax.plot(x, y, style, color=color, label=f"{set_name} {metric.title()}")
        held = [2 * sum(e["verified"]) > len(e["verified"]) for e in entries]
        ax.scatter(
          x, y, s=18, color=color, facecolors=[color if h else "white" for h in held], zorder=3
        )
      labels = ["none"] + [f"{e['strength']:g}" for e in points.get(name, [])]
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_title(f"{name} ({strength})", fontsize=8)
    ax.set_ylim(-2, 102)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in axes[len(names) :]:
    ax.axis("off")
  axes[0].set_ylabel("%", fontsize=8)
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7)
  fig.suptitle(
    "Attacks: Acc (solid), Acc_W (dashed); filled = verified in most networks", fontsize=9
  )
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  reporting.save_figure(fig, path)


def save_data_threats_plot(path: pathlib.Path, data: dict) -> None:
  """attacks_data.png: Acc and Acc_W per attack on the data (left), detectors' AUC (right)."""
  from matplotlib.figure import Figure  # Imported on first use: it is slow to import.

  rows = [("none", data["before"])]
  rows += [(f"{n} {e['strength']:g}", e) for n, entries in data["points"].items() for e in entries]
  det = data["detection"]
  aucs = [
    ("parameter statistics", det["parameters"]["auc"]),
    ("Neural Cleanse: anomaly index", det["neural_cleanse"]["auc"]),
    ("Neural Cleanse: median norm", det["neural_cleanse"]["auc_median_norm"]),
    ("Neural Cleanse: corner mass", det["neural_cleanse"]["auc_corner_mass"]),
  ]
  for name, d in det["data"].items():
    aucs += [(f"{name}: trigger slots", d["trigger_slots_auc"]), (f"{name}: set", d["set_auc"])]
  fig = Figure(figsize=(12, 0.3 * max(len(rows), len(aucs)) + 1.5))
  left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
  y = np.arange(len(rows))
  for offset, metric, color in ((-0.2, "acc", "tab:blue"), (0.2, "acc_w", "tab:red")):
    values = [100 * e[metric]["mean"] for _, e in rows]
    left.barh(y + offset, values, 0.4, color=color, label=metric.title())
  for i, (_, e) in enumerate(rows):
    left.text(101, i, f"{reporting.verified_count(e)} verified", va="center", fontsize=7)
  left.set_yticks(y, [name for name, _ in rows], fontsize=7)
  left.invert_yaxis()
  left.set_xlim(0, 125)
  left.set_xlabel("%", fontsize=8)
  left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
  left.set_title("Networks trained on the attacked data: Acc, Acc_W", fontsize=9)
  y = np.arange(len(aucs))
  right.barh(y, [0.0 if v is None or v != v else v for _, v in aucs], color="tab:gray")
  right.axvline(0.5, color="k", lw=0.8, ls="--")
  right.set_yticks(y, [name for name, _ in aucs], fontsize=7)
  right.invert_yaxis()
  right.set_xlim(0, 1)
  right.set_title("Detectors: ROC AUC (0.5 = chance)", fontsize=9)
  fig.tight_layout()
  reporting.save_figure(fig, path)


def write_attacks(workdir: pathlib.Path, attacks: dict) -> None:
  """Writes attacks.json, attacks.png (with model attacks) and attacks_data.png (with data)."""
  reporting.write_json(pathlib.Path(workdir) / "attacks.json", attacks)
  if attacks["attacks"]:
    save_attacks_plot(pathlib.Path(workdir) / "attacks.png", attacks)
  if attacks.get("data"):
    save_data_threats_plot(pathlib.Path(workdir) / "attacks_data.png", attacks["data"])
