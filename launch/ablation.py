r"""Issue 10's ablation: the watermarked distillation's levers, alone and together, in one table.

  python launch/ablation.py                                  # digits, every variant
  python launch/ablation.py --variants default,paper --iterations_scale 0.5
  python launch/ablation.py --setting cifar10_cpu            # configs/cifar10_cpu_paper.py
  python launch/ablation.py --list                           # the variants and their fields

Every variant runs the pipeline's own stages (`pipeline.run`) in
<root>/<variant>/ with one key (<root>/owner.key) and `--eval_seeds`
evaluation seeds (5). Variants whose expert fields agree (the fields
`manifest.OWNER` gives to experts and the stages before it) share one
expert training, <root>/experts_<fingerprint>/: the variant's workdir links
its trajectories and starts from that workdir's manifest, so `manifest.check`
refuses the reuse if an expert field differed. A variant whose <root>/<variant>/
ablation.json exists is finished and skipped; an interrupted one resumes
(the stages resume). Each variant also distils and evaluates a clean set and
the real-data baseline (the pipeline always does); the table's "clean
distilled" and "real data" rows are the paper variant's.

Every variant derives from the setting's paper-literal config (digits:
configs/digits_paper.py; cifar10_cpu: configs/cifar10_cpu_paper.py) by the fields
`VARIANTS` lists; "default" is the setting's default config (digits:
configs/digits.py; cifar10_cpu: configs/cifar10_cpu.py; each is its
paper-literal config plus `DEFAULT_LEVERS`). The
default runs its own `distill.iterations`; the other variants run their
embedding's base length (`VARIANT_ITERATIONS`: the matching default's, at
which the earlier rows were measured, or the appended default's) times their
own factor; all times `--iterations_scale`. A variant whose expert kinds
(an appended one needs clean experts only) are not all in its shared expert
workdir runs the experts stage there first (it resumes: only the missing
kinds train). Writes <root>/ablation.json, the section between this setting's
markers (and `--tag`'s) in docs/results.md (`--results`) and
docs/ablation_<setting>[_<tag>].png (`--plot`).
"""

import argparse
import dataclasses
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
from ccdd_jax import config_loader
from ccdd_jax import distill as distill_lib
from ccdd_jax import manifest
from ccdd_jax import pipeline
from ccdd_jax import reporting
from ccdd_jax import settings

REPO = pathlib.Path(__file__).resolve().parent.parent

# setting -> (paper-literal config, default config or None = paper + DEFAULT_LEVERS).
SETTINGS = {
  "digits": ("configs/digits_paper.py", "configs/digits.py"),
  "cifar10_cpu": ("configs/cifar10_cpu_paper.py", "configs/cifar10_cpu.py"),
}

# "levers": the first combination that helped (trigger-safe experts, beta 0, 4 carriers).
LEVERS = {
  "experts.trigger_safe_dsa": True,
  "distill.beta": 0.0,
  "distill.carriers_per_pattern": 4,
}
# "levers_safe": plus the carriers' corner kept out of DSA and out of the image updates.
SAFE_LEVERS = {**LEVERS, "distill.trigger_safe_dsa": True, "distill.freeze_trigger": True}
# "levers_b": plus eq. 10 form (b) with beta 0.5 over fp-enhanced experts whose last 5
# epochs are normal (the default of results.md section 9; the base of section 9.1).
FORM_B_LEVERS = {
  **SAFE_LEVERS,
  "distill.beta": 0.5,
  "distill.eq10_form": "second_student",
  "experts.fp_normal_last_epochs": 5,
}
DIRECT = {"distill.gamma_wm": 0.3, "distill.gamma_clean": 0.3}
# levers_b plus the direct objective (better Acc at equal Acc_W on three keys, results.md
# 1.1): the default until section 9.4, and the base of the "default_*" variants.
LEVERS_B_DIRECT = {**FORM_B_LEVERS, **DIRECT}
# The best matching levers over the paper-literal config (configs/digits_matching.py;
# the default until the appended embedding): LEVERS_B_DIRECT with beta 1 (results.md 9.4).
MATCHING_LEVERS = {**LEVERS_B_DIRECT, "distill.beta": 1.0}
# The "appended" embedding (beyond the paper): the clean distilled set plus k stamped
# copies of its own images per pattern, never distilled (no seeded slots).
APPENDED = {
  "distill.watermark_embedding": "appended",
  "distill.triggers_per_pattern": 0,
  "distill.carrier_source": "set",
}
# Each setting's default over its paper-literal config (configs/digits.py on digits, with
# its own iterations): the appended embedding, with the carriers measured per setting
# (results.md 1 and 10.1: 9 per pattern on digits, 5 on the CIFAR-10 scale-down, where
# 7 patterns instead of 10 cut the carriers' cost: results.md 10.3).
DEFAULT_LEVERS = {
  "digits": {**APPENDED, "distill.carriers_per_pattern": 9},
  "cifar10_cpu": {**APPENDED, "distill.carriers_per_pattern": 5, "watermark.n_patterns": 7},
}
# The length of the variants of each embedding (x their iterations_factor): its default's.
# Matching: 300 on digits (every row of results.md 9 and 9.1-9.4 ran there), the config's
# 200 on CIFAR-10; appended: the default's 600 on digits (the watermarked distillation it
# skips pays for them), 200 on CIFAR-10.
VARIANT_ITERATIONS = {
  ("digits", "matching"): 300,
  ("digits", "appended"): 600,
  ("cifar10_cpu", "matching"): 200,
  ("cifar10_cpu", "appended"): 200,
}
# Where each setting's section sits in docs/results.md ((setting, tag) for tagged ones).
SECTION_NUMBERS = {
  "digits": 9,
  "cifar10_cpu": 10,
  ("digits", "appended"): "9.5",
  ("cifar10_cpu", "appended"): "10.1",
}


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  label: str
  fields: dict | None  # Over the paper-literal config; None = the setting's default config.
  iterations_factor: float = 1.0


VARIANTS = (
  Variant("default", "default: the clean distilled set + stamped carriers (appended)", None),
  Variant("paper", "paper: eq. 10 literal (a), β 0.5", {}),
  Variant("beta0", "β 0 (no twin term)", {"distill.beta": 0.0}),
  Variant(
    "second_student", "eq. 10 (b) second student, β 0.5", {"distill.eq10_form": "second_student"}
  ),
  Variant(
    "student_normalised",
    "eq. 10 (c) student-normalised, β 0.5",
    {"distill.eq10_form": "student_normalised"},
  ),
  Variant("clean_pool", "pool: 50% clean experts, β 0.5", {"distill.clean_expert_fraction": 0.5}),
  Variant(
    "safe_experts",
    "trigger-safe expert DSA, β 0",
    {"experts.trigger_safe_dsa": True, "distill.beta": 0.0},
  ),
  Variant(
    "carriers4", "β 0, 4 carriers/pattern", {"distill.beta": 0.0, "distill.carriers_per_pattern": 4}
  ),
  Variant("direct", "β 0, 0.3 CE(D_W) + 0.3 CE(clean)", {"distill.beta": 0.0, **DIRECT}),
  Variant("levers", "levers: trigger-safe experts, β 0, 4 carriers/pattern", dict(LEVERS)),
  Variant(
    "levers_carriers8",
    "levers, 8 carriers/pattern",
    {**LEVERS, "distill.carriers_per_pattern": 8},
  ),
  Variant("levers_direct", "levers + 0.3 CE(D_W) + 0.3 CE(clean)", {**LEVERS, **DIRECT}),
  Variant(
    "levers_fp_normal",
    "levers with β 0.5 (b), fp experts normal last 5 epochs",
    {
      **LEVERS,
      "distill.beta": 0.5,
      "distill.eq10_form": "second_student",
      "experts.fp_normal_last_epochs": 5,
    },
  ),
  Variant("levers_2x", "levers, 2x iterations", dict(LEVERS), 2.0),
  Variant(
    "levers_half_batch_2x",
    "levers, batch_syn 70 (half the set), 2x iterations",
    {**LEVERS, "distill.batch_syn": 70},
    2.0,
  ),
  Variant(
    "levers_safe",
    "levers + trigger-safe distill DSA, frozen corner",
    dict(SAFE_LEVERS),
  ),
  Variant(
    "levers_safe_carriers8",
    "levers_safe, 8 carriers/pattern",
    {**SAFE_LEVERS, "distill.carriers_per_pattern": 8},
  ),
  # levers_b (the default before the direct objective) combined with the other levers.
  Variant("levers_b", "levers_safe + β 0.5 (b), fp experts normal last 5 epochs", FORM_B_LEVERS),
  Variant(
    "levers_b_direct", "levers_b + 0.3 CE(D_W) + 0.3 CE(clean) (default until 9.4)", LEVERS_B_DIRECT
  ),
  Variant("levers_b_2x", "levers_b, 2x iterations", dict(FORM_B_LEVERS), 2.0),
  Variant(
    "levers_b_carriers8",
    "levers_b, 8 carriers/pattern",
    {**FORM_B_LEVERS, "distill.carriers_per_pattern": 8},
  ),
  Variant(
    "levers_b_direct_carriers8",
    "levers_b + direct, 8 carriers/pattern",
    {**LEVERS_B_DIRECT, "distill.carriers_per_pattern": 8},
  ),
  Variant(
    "levers_b_direct_carriers8_1_5x",
    "levers_b + direct, 8 carriers/pattern, 1.5x iterations",
    {**LEVERS_B_DIRECT, "distill.carriers_per_pattern": 8},
    1.5,
  ),
  Variant(
    "levers_b_carriers8_2x",
    "levers_b, 8 carriers/pattern, 2x iterations",
    {**FORM_B_LEVERS, "distill.carriers_per_pattern": 8},
    2.0,
  ),
  # levers_b_direct (the default until 9.4) traded along its frontier; "default_beta1" is
  # today's default (kept under this name for the paired table of 9.4).
  Variant("default_2x", "levers_b_direct, 2x iterations", dict(LEVERS_B_DIRECT), 2.0),
  Variant(
    "default_carriers2",
    "levers_b_direct, 2 carriers/pattern",
    {**LEVERS_B_DIRECT, "distill.carriers_per_pattern": 2},
  ),
  Variant(
    "default_lambda1_half",
    "levers_b_direct over experts with λ1 0.5 (eq. 6)",
    {**LEVERS_B_DIRECT, "experts.lambda1": 0.5},
  ),
  Variant(
    "default_lambda1_2",
    "levers_b_direct over experts with λ1 2 (eq. 6)",
    {**LEVERS_B_DIRECT, "experts.lambda1": 2.0},
  ),
  Variant(
    "default_beta1",
    "levers_b_direct with β 1 (= configs/digits_matching.py)",
    dict(MATCHING_LEVERS),
  ),
  # Learned soft labels (TESLA / DATM): from an expert's logits (DATM) or from one-hot.
  Variant(
    "default_soft_expert",
    "levers_b_direct + soft labels from the expert's logits, lr 2",
    {**LEVERS_B_DIRECT, "distill.soft_labels": "expert"},
  ),
  Variant(
    "default_soft_expert_lr20",
    "levers_b_direct + soft labels from the expert's logits, lr 20",
    {**LEVERS_B_DIRECT, "distill.soft_labels": "expert", "distill.lr_label": 20.0},
  ),
  Variant(
    "default_soft_one_hot",
    "levers_b_direct + soft labels from 5 one-hot, lr 2",
    {**LEVERS_B_DIRECT, "distill.soft_labels": "one_hot"},
  ),
  # Beyond the issue: the pool with split roles (the trigger slots learn from watermarked
  # trajectories, the class images from clean ones).
  Variant(
    "split",
    "levers_b_direct + 50% clean experts, split roles",
    {**LEVERS_B_DIRECT, "distill.clean_expert_fraction": 0.5, "distill.split_roles": True},
  ),
  Variant(
    "split_wm70",
    "levers_b_direct + 30% clean experts, split roles",
    {**LEVERS_B_DIRECT, "distill.clean_expert_fraction": 0.3, "distill.split_roles": True},
  ),
  Variant(
    "levers_b_clean_experts",
    "levers_b's carriers over clean experts only (pool 100% clean)",
    {**FORM_B_LEVERS, "distill.clean_expert_fraction": 1.0},
  ),
  # The appended embedding: how many carriers, from where, and the clean set's length.
  *(
    Variant(
      f"appended_set{k}",
      f"appended: clean distilled set + {k} stamped copies of its images per pattern",
      {**APPENDED, "distill.carriers_per_pattern": k},
    )
    for k in (3, 5, 7, 9)
  ),
  Variant(
    "appended_train9",
    "appended: clean distilled set + 9 stamped training images per pattern",
    {**APPENDED, "distill.carrier_source": "train", "distill.carriers_per_pattern": 9},
  ),
  Variant(
    "appended_set9_half",
    "appended_set9 with half the iterations",
    {**APPENDED, "distill.carriers_per_pattern": 9},
    0.5,
  ),
)
BY_NAME = {v.name: v for v in VARIANTS}


def _path(relative: str) -> str:
  return str(REPO / relative)


def _set(config: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  for field, value in fields.items():
    section, name = field.split(".")
    if name not in config[section]:
      raise KeyError(f"unknown config field {field}")
    config[section][name] = value
  return config


def default_config(setting: str, overrides=()) -> ml_collections.ConfigDict:
  """The setting's default: its default config file, or the paper config plus its
  DEFAULT_LEVERS."""
  paper, default = SETTINGS[setting]
  if default:
    return config_loader.load(_path(default), list(overrides))
  return _set(config_loader.load(_path(paper), list(overrides)), DEFAULT_LEVERS[setting])


def variant_iterations(setting: str, variant: Variant) -> int:
  """A field variant's length before --iterations_scale (VARIANT_ITERATIONS)."""
  embedding = (variant.fields or {}).get("distill.watermark_embedding", "matching")
  return round(VARIANT_ITERATIONS[setting, embedding] * variant.iterations_factor)


def variant_config(
  setting: str,
  variant: Variant,
  iterations_scale: float = 1.0,
  eval_seeds: int = 5,
  overrides=(),
) -> ml_collections.ConfigDict:
  """One variant's validated config (`overrides`: field=value strings applied to every variant)."""
  if variant.fields is None:
    config = default_config(setting, overrides)
    iterations = config.distill.iterations
  else:
    config = _set(config_loader.load(_path(SETTINGS[setting][0]), list(overrides)), variant.fields)
    iterations = variant_iterations(setting, variant)
  config.distill.iterations = max(1, round(iterations * iterations_scale))
  config.eval.num_seeds = eval_seeds
  if config.attacks.num_seeds > eval_seeds:
    config.attacks.num_seeds = 0
  settings.validate(config)
  return config


def experts_group(config: ml_collections.ConfigDict) -> str:
  """A tag shared by the configs whose experts (and everything before them) are the same."""
  return manifest.fingerprint(manifest.record(config, "ablation", 0), "experts")


def run_variant(
  name: str, config: ml_collections.ConfigDict, root: pathlib.Path, key_file: pathlib.Path
) -> dict:
  """Runs, resumes or reads back one variant; returns its row (also <root>/<name>/ablation.json)."""
  workdir = root / name
  done = reporting.read_json(workdir / "ablation.json")
  if done:  # Read back only if the workdir was made with this very config.
    old = reporting.read_json(workdir / "manifest.json").get("fields", {})
    changed = manifest.differing(
      old, manifest.record(config, old.get("key"), old.get("num_classes"))
    )
    if changed:
      raise CCDDError(f"{workdir} was made with other values of {', '.join(changed)}: remove it")
    reporting.log(f"== {name}: finished earlier ({workdir / 'ablation.json'})")
    return dict(done, variant=name)
  base = root / f"experts_{experts_group(config)}"
  trained = reporting.read_json(base / "experts.json")
  if not all(kind in trained for kind in distill_lib.expert_kinds(config.distill)):
    reporting.log(f"== {name}: training experts in {base}")  # Kinds already there resume.
    pipeline.run(config, str(base), "keygen", str(key_file))
    pipeline.run(config, str(base), "experts", str(key_file))
  workdir.mkdir(parents=True, exist_ok=True)
  if not (workdir / "trajectories").exists():
    (workdir / "trajectories").symlink_to((base / "trajectories").resolve())
  for file in ("experts.json", "manifest.json"):
    if not (workdir / file).exists():
      reporting.write_text(workdir / file, (base / file).read_text())
  reporting.log(f"== {name}: {config.distill.iterations} iterations -> {workdir}")
  start = time.time()
  for stage in ("distill", "evaluate"):
    pipeline.run(config, str(workdir), stage, str(key_file))
  report = pipeline.run(config, str(workdir), "verify", str(key_file))
  result = row(name, config, report, time.time() - start)
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
  return {
    "variant": name,
    "label": BY_NAME[name].label if name in BY_NAME else name,
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
    "fields": {k: v for k, v in (BY_NAME[name].fields or {}).items()} if name in BY_NAME else {},
  }


def _pct(stat: dict) -> str:
  return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _terms(r: dict, term: str) -> str:
  return f"{r[f'{term}_first']:.2f} → {r[f'{term}_last']:.2f}"


def section_markdown(setting: str, rows: list, meta: dict, tag: str = "") -> str:
  """The results section of one setting (and tag): how it was made, then the table."""
  number = SECTION_NUMBERS.get((setting, tag) if tag else setting, "")
  lines = [
    f"## {number}. Ablation of issue 10's levers: {setting}" + (f" ({tag})" if tag else ""),
    "",
    f"    {meta['command']}        # commit {meta['commit']}, {meta['date']}",
    "",
    f"Made by `launch/ablation.py` on {meta['machine']}, Python {meta['python']}, "
    f"jax {meta['jax']}. One key (fingerprint {meta['key']}) for every variant, "
    f"{meta['eval_seeds']} evaluation seeds; the iterations column gives each row's length "
    f"(the default: its config's {meta['default_iterations']}; the other variants: their "
    f"embedding's base, {meta['variant_iterations']}, × their own factor; all "
    f"× {meta['iterations_scale']:g}). Variants are the paper-literal config "
    f"(`{SETTINGS[setting][0]}`) plus the fields named in `launch/ablation.py`; "
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
    "| variant | what | images | iterations | Acc | Acc_W | verified | median p | vis. | "
    "expert term | twin term | direct | wall s | experts s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    label = BY_NAME[r["variant"]].label if r["variant"] in BY_NAME else r["label"]
    lines.append(
      f"| {r['variant']} | {label} | {r['num_images']} | {r['iterations']} | "
      f"{_pct(r['acc'])} | {_pct(r['acc_w'])} | {r['verified']}/{r['seeds']} | "
      f"{r['median_p']:.2g} | {r['visibility']:.2f} | {_terms(r, 'expert_term')} | "
      f"{_terms(r, 'twin_term')} | {_terms(r, 'direct_term')} | {r['seconds']:.0f} | "
      f"{r['experts_seconds']:.0f} |"
    )
  base = next((r for r in rows if r["variant"] == "paper"), rows[0] if rows else None)
  if base is not None:
    for which, label in (("clean_distilled", "clean distilled"), ("real", "real data")):
      b = base[which]
      lines.append(
        f"| {which} | {label} (from the {base['variant']} run) | – | – | {_pct(b['acc'])} | "
        f"{_pct(b['acc_w'])} | {b['verified']}/{b['seeds']} | {b['median_p']:.2g} | – | – | "
        "– | – | – | – |"
      )
  lines += ["", f"![Acc against Acc_W per variant]({meta['plot_name']})", ""]
  return "\n".join(lines)


def markers(setting: str, tag: str = "") -> tuple[str, str]:
  name = f"{setting}:{tag}" if tag else setting
  return f"<!-- ablation:{name}:begin -->", f"<!-- ablation:{name}:end -->"


def replace_section(text: str, setting: str, body: str, tag: str = "") -> str:
  """`text` with the setting's (and tag's) marked section replaced by `body` (appended
  when absent)."""
  begin, end = markers(setting, tag)
  block = f"{begin}\n{body.rstrip()}\n{end}"
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    return head + block + rest.split(end, 1)[1]
  return text.rstrip("\n") + "\n\n" + block + "\n"


def save_plot(rows: list, path: pathlib.Path, setting: str) -> None:
  """Acc against Acc_W, one point per variant with std error bars (and the baselines)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(7, 5))
  points = [(r["variant"], r, "o") for r in rows]
  base = next((r for r in rows if r["variant"] == "paper"), rows[0] if rows else None)
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
  ax.plot([90], [88], marker="*", markersize=12, color="tab:green", linestyle="none")
  ax.annotate("issue 10 target (digits)", (90, 88), textcoords="offset points", xytext=(-60, 8))
  ax.set_xlabel("Acc_W of networks trained on the set (%)")
  ax.set_ylabel("Acc on the test split (%)")
  ax.set_title(f"Issue 10 ablation: {setting} (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  reporting.save_figure(fig, path)
  plt.close(fig)


def _commit() -> str:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--setting", default="digits", choices=sorted(SETTINGS))
  parser.add_argument("--root", default="", help="workdirs (default runs/ablation_<setting>)")
  parser.add_argument("--variants", default="", help="comma-separated names (default: all)")
  parser.add_argument("--iterations_scale", type=float, default=1.0)
  parser.add_argument("--eval_seeds", type=int, default=5)
  parser.add_argument("--results", default=str(REPO / "docs" / "results.md"))
  parser.add_argument("--plot", default="", help="default docs/ablation_<setting>[_<tag>].png")
  parser.add_argument(
    "--tag", default="", help="write a section of its own (markers ablation:<setting>:<tag>)"
  )
  parser.add_argument("--set", action="append", default=[], help="field=value for every variant")
  parser.add_argument("--list", action="store_true", help="print the variants and exit")
  args = parser.parse_args(argv)
  names = [n for n in args.variants.split(",") if n] or [v.name for v in VARIANTS]
  unknown = [n for n in names if n not in BY_NAME]
  if unknown:
    parser.error(f"unknown variants {unknown}: use some of {', '.join(BY_NAME)}")
  configs = {
    n: variant_config(args.setting, BY_NAME[n], args.iterations_scale, args.eval_seeds, args.set)
    for n in names
  }  # All validated before any work.
  if args.list:
    for n in names:
      fields = BY_NAME[n].fields
      print(f"{n:22s} {configs[n].distill.iterations:5d} its  {fields}")
    return
  root = pathlib.Path(args.root or REPO / "runs" / f"ablation_{args.setting}")
  root.mkdir(parents=True, exist_ok=True)
  key_file = root / "owner.key"
  suffix = f"_{args.tag}" if args.tag else ""
  plot = pathlib.Path(args.plot or REPO / "docs" / f"ablation_{args.setting}{suffix}.png")
  default_iterations = default_config(args.setting, args.set).distill.iterations
  rows = []
  for n in names:
    rows.append(run_variant(n, configs[n], root, key_file))
    reporting.write_json(root / "ablation.json", rows)
    from ccdd_jax import watermark  # pylint: disable=g-import-not-at-top

    meta = {
      "command": "python launch/ablation.py "
      + " ".join(argv if argv is not None else sys.argv[1:]),
      "commit": _commit(),
      "date": datetime.date.today().isoformat(),
      "machine": f"{os.cpu_count()}-core {platform.machine()} ({jax.default_backend()})",
      "python": platform.python_version(),
      "jax": jax.__version__,
      "key": watermark.key_fingerprint(watermark.read_key_file(key_file)),
      "eval_seeds": args.eval_seeds,
      "default_iterations": default_iterations,
      "variant_iterations": ", ".join(
        f"{e} {n}" for (s, e), n in VARIANT_ITERATIONS.items() if s == args.setting
      ),
      "iterations_scale": args.iterations_scale,
      "plot_name": plot.name,
    }
    results = pathlib.Path(args.results)
    text = results.read_text() if results.is_file() else "# Results\n"
    body = section_markdown(args.setting, rows, meta, args.tag)
    reporting.write_text(results, replace_section(text, args.setting, body, args.tag))
    save_plot(rows, plot, args.setting)
  print(json.dumps([{k: r[k] for k in ("variant", "acc", "acc_w", "verified")} for r in rows]))


if __name__ == "__main__":
  main()
