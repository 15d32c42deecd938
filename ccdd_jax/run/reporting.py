"""What a run shows people: progress lines, JSON files, the report and its pictures.

Everything here takes plain data (dicts, arrays, paths), never the pipeline's Context.

  report.json  the figures of every stage (see `build_report`)
  report.md    its short table (`report_markdown`), with the attacks' (`attacks_markdown`)
  *.png        distilled images, one row per class (`save_grid`)
  (attacks.json and its pictures: attack_plots.py)
"""

from collections.abc import Callable
import json
import os
import pathlib
import sys
import threading
import time
from typing import Any

import jax
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.devices import sharding
from ccdd_jax.log import log
from ccdd_jax.method import evaluate
from ccdd_jax.run import stages


def fmt_pct(stat: dict) -> str:
  """ "mean ± std%" of a `evaluate.summarize` dict of fractions."""
  return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}%"


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes `obj` as indented JSON, atomically (a kill leaves the old file or the new one)."""
  path = pathlib.Path(path)
  write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def write_text(path: pathlib.Path, text: str) -> None:
  """Writes a text file atomically (a kill leaves the old file or the new one); process 0 only."""
  if not sharding.is_writer():
    return
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def save_figure(fig, path: pathlib.Path) -> None:
  """Saves a matplotlib figure as PNG atomically (process 0 only)."""
  if not sharding.is_writer():
    return
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
  fig.savefig(tmp, dpi=100, format="png")
  os.replace(tmp, path)


def read_json(path: pathlib.Path) -> dict:
  """The JSON object in `path`, or {} when there is no such file; a one-line CCDDError
  naming the file and the stage that rewrites it when it is not a JSON object."""
  path = pathlib.Path(path)
  if not path.is_file():
    return {}
  try:
    content = json.loads(path.read_text())
    if not isinstance(content, dict):
      raise ValueError(f"a JSON {type(content).__name__}, not an object")
  except (OSError, UnicodeDecodeError, ValueError) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    hint = stages.rerun_hint(path.name)
    raise CCDDError(f"cannot read {path}, it is corrupt or truncated ({reason}): {hint}") from None
  return content


def progress_printer(name: str, total: int, start: int = 0) -> Callable[[int, Any], None]:
  """A callback `progress(iteration, loss)`: a tqdm bar that counts from `start` (resumed)."""
  from tqdm import auto as tqdm  # Imported on first use: only distillation shows a bar.

  style = {"desc": f"[distill] {name}", "file": sys.stderr, "mininterval": 2.0, "leave": False}
  bar = tqdm.tqdm(total=total, initial=start, **style)

  def progress(it, loss):
    bar.update(1)
    if it % 25 == 0 or it == total - 1:
      bar.set_postfix(loss=f"{float(loss):.3f}")
    if it == total - 1:
      bar.close()

  return progress


def group_progress(stage: str) -> Callable[[str, int, int], None]:
  """A callback `progress(what, done, total)` that logs each quarter of a stage's groups."""
  start = time.time()

  def progress(what, done, total):
    if total > 1 and (done == total or done % max(1, total // 4) == 0):
      log(f"[{stage}] {what}: {done}/{total} groups done ({time.time() - start:.0f} s)")

  return progress


def save_grid(
  path: pathlib.Path,
  pixels: np.ndarray,
  labels: np.ndarray,
  class_names: tuple,
  from_trigger: np.ndarray,
  title: str,
) -> None:
  """A PNG grid of [0, 1] pixels, one row per class; slots seeded from D_W framed in red."""
  # The Figure API, not pyplot: the two distilled sets may be saved from two threads.
  from matplotlib.figure import Figure  # Imported on first use: it is slow to import.

  classes = sorted({int(label) for label in labels})
  per_class = max(int(np.sum(labels == c)) for c in classes)
  fig = Figure(figsize=(0.8 * per_class + 0.6, 0.8 * len(classes) + 0.5))
  axes = fig.subplots(len(classes), per_class, squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for row, c in enumerate(classes):
    for col, i in enumerate(np.flatnonzero(labels == c)):
      ax = axes[row, col]
      img = pixels[i]
      ax.imshow(
        img[..., 0] if img.shape[-1] == 1 else img,
        cmap="gray" if img.shape[-1] == 1 else None,
        vmin=0,
        vmax=1,
        interpolation="nearest",
      )
      if from_trigger[i]:
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
          spine.set_edgecolor("red")
          spine.set_linewidth(2)
    axes[row, 0].set_title(class_names[c], fontsize=7, loc="left")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  save_figure(fig, path)


def distill_summary(
  losses: np.ndarray, lr: float, visibility: np.ndarray, from_trigger: np.ndarray, seconds: float
) -> dict:
  """distill.json's entry for one set: eq. 10 and its terms early and late, trigger visibility."""
  first, last = losses[:20].mean(axis=0), losses[-20:].mean(axis=0)
  return {
    "trigger_visibility": {
      "mean": float(visibility.mean()),
      "trigger_slots": float(visibility[from_trigger].mean()) if from_trigger.any() else None,
      "real_slots": float(visibility[~from_trigger].mean()) if not from_trigger.all() else None,
    },
    "lr": lr,
    "loss_first": float(first[0]),
    "loss_last": float(last[0]),
    "expert_term_first": float(first[1]),
    "expert_term_last": float(last[1]),
    "twin_term_first": float(first[2]),
    "twin_term_last": float(last[2]),
    "direct_term_first": float(first[3]) if len(first) > 3 else 0.0,
    "direct_term_last": float(last[3]) if len(last) > 3 else 0.0,
    "num_images": len(from_trigger),
    "seconds": seconds,
  }


def distill_line(name: str, entry: dict) -> str:
  """One log line of a `distill_summary` entry."""
  e = entry
  return (
    f"[distill] {name}: eq. 10 loss {e['loss_first']:.3f} -> {e['loss_last']:.3f} "
    f"(expert term {e['expert_term_first']:.3f} -> {e['expert_term_last']:.3f}, "
    f"twin term {e['twin_term_first']:.3f} -> {e['twin_term_last']:.3f}, direct "
    f"{e['direct_term_first']:.3f} -> {e['direct_term_last']:.3f}), learned lr "
    f"{e['lr']:.4g}, trigger visibility {e['trigger_visibility']['mean']:.2f} "
    f"({e['seconds']:.0f} s)"
  )


def report_header(
  config, dataset_name: str, num_classes: int, patch_size: int, key_fingerprint: str, timings: dict
) -> dict:
  """The run-level fields of report.json."""
  return {
    "dataset": dataset_name,
    "num_classes": num_classes,
    "ipc": config.distill.ipc,
    "n_patterns": config.watermark.n_patterns,
    "patch_size": patch_size,
    "alpha": config.watermark.alpha,
    "embedding": config.distill.watermark_embedding,
    "queries": config.watermark.queries,
    "queries_per_pattern": config.watermark.queries_per_pattern,
    "key_fingerprint": key_fingerprint,
    "wall_seconds": timings,
    "jax_version": jax.__version__,
    "backend": jax.default_backend(),
    "config": config.to_dict(),
  }


def build_report(workdir: pathlib.Path, header: dict, primary_arch: str) -> dict:
  """report.json: `header` plus the stages' JSON files, evaluation merged with verification.

  The distillation model's (`primary_arch`) figures also sit at the top level
  under each set's name.
  """
  workdir = pathlib.Path(workdir)
  evaluation = read_json(workdir / "evaluation.json")
  verification = read_json(workdir / "verification.json")
  report = dict(header)
  report["experts"] = read_json(workdir / "experts.json")
  report["distill"] = read_json(workdir / "distill.json")
  architectures = {}
  for arch, evaluated in evaluation.items():
    architectures[arch] = {}
    for name, entry in evaluated.items():
      entry = dict(entry)
      v = verification.get(arch, {}).get(name, {})
      entry.update({k: v[k] for k in ("p_values", "p_values_majority", "verified") if k in v})
      architectures[arch][name] = entry
  report["architectures"] = architectures
  for name in evaluate.SETS:
    report[name] = architectures.get(primary_arch, {}).get(name, {})
  attacks = read_json(workdir / "attacks.json")
  if attacks:
    report["attacks"] = attacks
  return report


def write_report(workdir: pathlib.Path, report: dict) -> None:
  """Writes report.json and report.md."""
  write_json(pathlib.Path(workdir) / "report.json", report)
  write_text(pathlib.Path(workdir) / "report.md", report_markdown(report))


def report_markdown(report: dict) -> str:
  """The short human-readable table of report.json."""
  lines = [
    f"# CCDD run: {report['dataset']}, IPC {report['ipc']}, "
    f"n = {report['n_patterns']} patterns, alpha = {report['alpha']:g}, "
    f"{report.get('embedding')} embedding, {report.get('queries')} queries (Acc_W: spec 5, 9.2)",
    "",
    "| model | set | Acc | Acc_W | verified | median p (conditional) | median p (majority) |",
    "|---|---|---|---|---|---|---|",
  ]
  for arch, evaluated in report.get("architectures", {}).items():
    for name in evaluate.SETS:
      e = evaluated.get(name, {})
      if "acc" not in e:
        continue
      ver = e.get("verified", [])
      p = e.get("p_values", [])
      pm = e.get("p_values_majority", [])
      lines.append(
        f"| {arch} | {name} | {fmt_pct(e['acc'])} | {fmt_pct(e['acc_w'])} | "
        f"{sum(ver)}/{len(ver)} | {np.median(p) if p else float('nan'):.3g} | "
        f"{np.median(pm) if pm else float('nan'):.3g} |"
      )
  experts = report.get("experts", {})
  kinds = [k for k, v in experts.items() if isinstance(v, dict) and "acc" in v]
  if kinds:
    lines += ["", "| experts | Acc | Acc_W |", "|---|---|---|"]
    for kind in kinds:
      lines.append(
        f"| {kind} | {fmt_pct(experts[kind]['acc'])} | {fmt_pct(experts[kind]['acc_w'])} |"
      )
  if report.get("attacks"):
    lines += ["", *attacks_markdown(report["attacks"])]
  lines += [
    "",
    "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["wall_seconds"].items()),
    "",
  ]
  return "\n".join(lines)


def verified_count(entry: dict) -> str:
  """ "k/n": how many of a measured point's networks are verified."""
  return f"{sum(entry['verified'])}/{len(entry['verified'])}"


def attacks_markdown(attacks: dict) -> list[str]:
  """The lines of report.md's attacks table (threats.run_suite's result)."""
  lines = [
    f"Attacks (attacks.json): {attacks['attacker_images']} clean images of the attacker's; "
    f"removed = verification fails with Acc down < {100 * attacks['max_acc_drop']:.0f} points "
    "(in most networks verified before); new key = the overwriting pirate's "
    f"({attacks['pirate_wm_images']} stamped images).",
    "",
    "| set | attack | strength | Acc | Acc change | Acc_W | verified | new key Acc_R, verified "
    "| verdict |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for set_name, points in attacks["sets"].items():
    for name, entries in points.items():
      if name == "before":
        entries = [entries]
      for e in entries:
        strength = (
          "-"
          if e["strength"] is None
          else f"{attacks['attacks'][name]['strength']} {e['strength']:g}"
        )
        change = "-" if e["strength"] is None else f"{-100 * e['acc_drop']:+.1f}"
        pirate = e.get("pirate")
        new_key = f"{fmt_pct(pirate['acc_r'])}, {verified_count(pirate)}" if pirate else "-"
        lines.append(
          f"| {set_name} | {'none' if name == 'before' else name} | {strength} | "
          f"{fmt_pct(e['acc'])} | {change} | {fmt_pct(e['acc_w'])} | "
          f"{verified_count(e)} | {new_key} | {e['verdict']} |"
        )
  if attacks.get("data"):
    lines += ["", *data_threats_markdown(attacks["data"])]
  return lines


def _auc(value) -> str:
  return "-" if value is None or value != value else f"{value:.2f}"


def data_threats_markdown(data: dict) -> list[str]:
  """The lines of report.md's tables of the attacks on the distilled data (data_threats.run)."""
  lines = [
    f"Attacks on the distilled data ({data['num_images']} images, {data['trigger_slots']} "
    f"trigger slots; the pirate's clean model: {data['clean_model']['images']} images, Acc "
    f"{100 * data['clean_model']['acc']:.1f}%): networks trained on what the pirate keeps or "
    "how it trains, verified with the owner's key.",
    "",
    "| attack | strength | images kept | trigger slots dropped | Acc | Acc change | Acc_W "
    "| verified | verdict |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  rows = [("none", None, data["before"])]
  rows += [(n, e["strength"], e) for n, entries in data["points"].items() for e in entries]
  for name, value, e in rows:
    strength = "-" if value is None else f"{data['attacks'][name]['strength']} {value:g}"
    kept = data["num_images"] - e.get("dropped", 0)
    dropped = f"{e['trigger_slots_dropped']}/{data['trigger_slots']}" if "dropped" in e else "-"
    change = "-" if value is None else f"{-100 * e['acc_drop']:+.1f}"
    lines.append(
      f"| {name} | {strength} | {kept} | {dropped} | {fmt_pct(e['acc'])} | {change} | "
      f"{fmt_pct(e['acc_w'])} | {verified_count(e)} | {e['verdict']} |"
    )
  det = data["detection"]
  p, nc = det["parameters"], det["neural_cleanse"]
  lines += [
    "",
    "| detector | positives vs negatives | ROC AUC | also |",
    "|---|---|---|---|",
    f"| parameter statistics (distance to clean reference) | {p['n_watermarked']} vs "
    f"{p['n_clean']} networks | {_auc(p['auc'])} | smallest Mann-Whitney p "
    f"{p['min_p_mannwhitney']:.3g} of {p['n_statistics']} statistics (Bonferroni "
    f"{p['bonferroni_p_mannwhitney']:.3g}) |",
    f"| Neural Cleanse anomaly index | {len(nc['distilled']['anomaly_index'])} vs "
    f"{len(nc['clean_distilled']['anomaly_index'])} networks | {_auc(nc['auc'])} | flagged "
    f"(index > {nc['threshold']:g}): {nc['distilled']['flagged']} watermarked-set, "
    f"{nc['clean_distilled']['flagged']} clean-set networks |",
    f"| Neural Cleanse median mask norm (smaller = watermarked) | same | "
    f"{_auc(nc['auc_median_norm'])} | needs clean reference networks |",
    f"| Neural Cleanse mask mass on the trigger corner | same | "
    f"{_auc(nc['auc_corner_mass'])} | needs clean reference networks |",
  ]
  for name, d in det["data"].items():
    who = " (owner's view: uses the key)" if d["uses_key"] else ""
    lines += [
      f"| {name} score{who} | trigger slots vs other images of the set | "
      f"{_auc(d['trigger_slots_auc'])} | |",
      f"| {name} score{who} | watermarked vs clean distilled set's images | "
      f"{_auc(d['set_auc'])} | |",
    ]
  return lines + _cleansers_markdown(data)


def _cleansers_markdown(data: dict) -> list[str]:
  """One row per cleanser: its trigger slots' AUC, what its rule flags, and the networks
  verified after each of its drops (data_suite._cleanser_summary)."""
  table = data.get("cleansers") or {}
  drops = list(dict.fromkeys(d for entry in table.values() for d in entry["after"]))
  head = ["cleanser", "trigger slots' ROC AUC", "flagged (trigger slots; clean set)"]
  head += [f"verified after {d}" for d in drops] + ["flag rule"]
  lines = [
    "",
    "Cleansers (the pirate's view, no key): how well each score ranks the trigger slots, how "
    "many images its rule flags (of them trigger slots; on the clean distilled set), and the "
    "networks still verified after each drop (verdict).",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for name, e in table.items():
    flagged = f"{e['flagged']} ({e['flagged_trigger_slots']}/{data['trigger_slots']}; "
    row = [name, _auc(e["trigger_slots_auc"]), f"{flagged}{e['flagged_clean_distilled']})"]
    after = [e["after"].get(d) for d in drops]
    row += [
      "-" if a is None else f"{a['verified']}/{a['networks']} ({a['verdict']})" for a in after
    ]
    lines.append("| " + " | ".join(row + [e["rule"]]) + " |")
  chance = {
    f"top {100 * e['strength']:g}%": e for e in data.get("points", {}).get("drop_random", [])
  }
  if table and chance:  # A drop that does no better than chance found nothing.
    row = ["drop_random (chance)", "-", "-"] + [
      f"{verified_count(c)} ({c['verdict']})" if c else "-" for c in map(chance.get, drops)
    ]
    lines.append("| " + " | ".join(row + ["a uniform draw of k%"]) + " |")
  return lines if table else []
