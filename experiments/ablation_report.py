"""The ablation's outputs: its markdown table (<root>/ablation.md) and its plot of Acc
against Acc_W (<root>/ablation_<setting>[_<tag>].png).

  python -m experiments.ablation --root runs/ablation_digits     # writes both under the root
"""

import pathlib

from ccdd_jax.run import reporting
from experiments import variants

# Acceptance target per setting, drawn on the plot: (Acc_W %, Acc %).
TARGETS = {"digits": (90, 88)}


def plot_name(setting: str, tag: str = "") -> str:
  """The plot's file name under the root: ablation_<setting>[_<tag>].png."""
  return f"ablation_{setting}{f'_{tag}' if tag else ''}.png"


def _pct(stat: dict) -> str:
  return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _terms(r: dict, term: str) -> str:
  return f"{r[f'{term}_first']:.2f} → {r[f'{term}_last']:.2f}"


def _label(r: dict) -> str:
  return variants.BY_NAME[r["variant"]].label if r["variant"] in variants.BY_NAME else r["label"]


def _baseline(rows: list) -> dict | None:
  """The row whose clean distilled and real-data runs stand for every variant's: paper's."""
  return next((r for r in rows if r["variant"] == "paper"), rows[0] if rows else None)


def _preamble(setting: str, meta: dict, tag: str) -> list[str]:
  """The heading, the command and how the table was made."""
  return [
    f"## Ablation of the watermarked distillation's levers: {setting}"
    + (f" ({tag})" if tag else ""),
    "",
    f"    {meta['command']}        # commit {meta['commit']}, {meta['date']}",
    "",
    f"Made by `experiments/ablation.py` on {meta['machine']}, Python {meta['python']}, "
    f"jax {meta['jax']}. One key (fingerprint {meta['key']}) for every variant, "
    f"{meta['eval_seeds']} evaluation seeds; the iterations column gives each row's length "
    f"(the default: its config's {meta['default_iterations']}; the other variants: their "
    f"embedding's base, {meta['variant_iterations']}, × their own factor; all "
    f"× {meta['iterations_scale']:g}). Variants are the paper-literal config "
    f"(`{variants.SETTINGS[setting][0]}`) plus the fields named in `experiments/variants.py`; "
    '"levers" = experts.trigger_safe_dsa, β 0, 4 carriers per pattern beyond IPC; '
    '"levers_safe" adds distill.trigger_safe_dsa and distill.freeze_trigger; "levers_b" '
    "adds eq. 10 form (b) with β 0.5 and experts.fp_normal_last_epochs = 5; "
    '"levers_b_direct" adds the direct objective 0.3 CE(D_W) + 0.3 CE(clean); '
    '"appended" = distill.watermark_embedding "appended": the clean distilled set plus k '
    "stamped carriers per pattern that are never distilled (the eq. 10 columns are then the "
    "clean set's). "
    "Acc / Acc_W: mean ± std over seeds (%); verified: seeds with p ≤ α = 1e-6; p: median "
    "conditional-test p; vis.: trigger visibility of the distilled images (mean); eq. 10 "
    "terms: mean of the first / last 20 iterations (expert term, twin term, direct "
    "objective); wall: distill + evaluate + verify of that variant in seconds (the "
    "pipeline also distils and evaluates a clean set and the real data each time), "
    'experts excluded (trained once per expert config, column "experts s").',
    "",
  ]


def markdown(setting: str, rows: list, meta: dict, tag: str = "") -> str:
  """<root>/ablation.md: how it was made, then one row per variant and the baselines."""
  lines = _preamble(setting, meta, tag) + [
    "| variant | what | images | iterations | Acc | Acc_W | verified | median p | vis. | "
    "expert term | twin term | direct | wall s | experts s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['variant']} | {_label(r)} | {r['num_images']} | {r['iterations']} | "
      f"{_pct(r['acc'])} | {_pct(r['acc_w'])} | {r['verified']}/{r['seeds']} | "
      f"{r['median_p']:.2g} | {r['visibility']:.2f} | {_terms(r, 'expert_term')} | "
      f"{_terms(r, 'twin_term')} | {_terms(r, 'direct_term')} | {r['seconds']:.0f} | "
      f"{r['experts_seconds']:.0f} |"
    )
  base = _baseline(rows)
  if base is not None:
    for which, label in (("clean_distilled", "clean distilled"), ("real", "real data")):
      b = base[which]
      lines.append(
        f"| {which} | {label} (from the {base['variant']} run) | – | – | {_pct(b['acc'])} | "
        f"{_pct(b['acc_w'])} | {b['verified']}/{b['seeds']} | {b['median_p']:.2g} | – | – | "
        "– | – | – | – |"
      )
  lines += ["", f"![Acc against Acc_W per variant]({plot_name(setting, tag)})", ""]
  return "\n".join(lines)


def save_plot(rows: list, path: pathlib.Path, setting: str) -> None:
  """Acc against Acc_W, one point per variant with std error bars (and the baselines)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 5))
  points = [(r["variant"], r, "o") for r in rows]
  base = _baseline(rows)
  if base is not None:
    points += [("clean distilled", base["clean_distilled"], "s"), ("real", base["real"], "^")]
  for name, r, marker in points:
    x, y = 100 * r["acc_w"]["mean"], 100 * r["acc"]["mean"]
    ax.errorbar(
      x,
      y,
      xerr=100 * r["acc_w"]["std"],
      yerr=100 * r["acc"]["std"],
      marker=marker,
      capsize=2,
      color="tab:red" if name == "default" else ("tab:gray" if marker != "o" else "tab:blue"),
    )
    ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
  if setting in TARGETS:
    x, y = TARGETS[setting]
    ax.plot([x], [y], marker="*", markersize=12, color="tab:green", linestyle="none")
    ax.annotate(f"target ({setting})", (x, y), textcoords="offset points", xytext=(-60, 8))
  ax.set_xlabel("Acc_W of networks trained on the set (%)")
  ax.set_ylabel("Acc on the test split (%)")
  ax.set_title(f"Ablation of the levers: {setting} (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  reporting.save_figure(fig, path)
  plt.close(fig)


def write(root: pathlib.Path, setting: str, rows: list, meta: dict, tag: str = "") -> None:
  """<root>/ablation.md and <root>/ablation_<setting>[_<tag>].png from the rows so far."""
  reporting.write_text(root / "ablation.md", markdown(setting, rows, meta, tag))
  save_plot(rows, root / plot_name(setting, tag), setting)
