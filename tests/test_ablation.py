"""experiments/variants.py: every variant's config validates; experiments/ablation.py: the
orchestration and one tiny run, its table and plot under the root; experiments/tradeoff.py's
table and plot."""

import json
import pathlib

from conftest import REPO
import ml_collections
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.config import loader as config_loader
from ccdd_jax.config import validation
from ccdd_jax.method import embedding
from ccdd_jax.method import watermark
from ccdd_jax.run import manifest
from ccdd_jax.run import reporting
from experiments import ablation
from experiments import ablation_report
from experiments import stealth_frontier
from experiments import tradeoff
from experiments import variants


@pytest.mark.parametrize("setting", sorted(variants.SETTINGS))
def test_every_variant_builds_a_valid_config(setting):
  default = variants.default_config(setting)
  for variant in variants.VARIANTS:
    config = variants.variant_config(setting, variant, iterations_scale=0.5, eval_seeds=5)
    validation.validate(config)
    if variant.fields is None:
      expected = max(1, round(default.distill.iterations * 0.5))
    else:
      embedding = config.distill.watermark_embedding
      base = variants.VARIANT_ITERATIONS[setting, embedding] * variant.iterations_factor
      expected = max(1, round(round(base) * 0.5))
    assert config.distill.iterations == expected, variant.name
    assert config.eval.num_seeds == 5
    for field, value in (variant.fields or {}).items():
      section, name = field.split(".")
      assert config[section][name] == value, (variant.name, field)


def test_digits_variants_are_the_shipped_configs():
  paper = config_loader.load(str(REPO / "configs" / "digits_paper.py"))
  default = config_loader.load(str(REPO / "configs" / "digits.py"))
  assert paper.distill.eq10_form == "literal" and paper.distill.beta == 0.5
  assert not paper.experts.trigger_safe_dsa and not paper.distill.carriers_per_pattern
  # The default is the paper-literal config plus its DEFAULT_LEVERS (and its own iterations).
  levers = variants.with_fields(config_loader.load(str(REPO / "configs" / "digits_paper.py")), {})
  levers = variants.with_fields(levers, variants.DEFAULT_LEVERS["digits"])
  levers.distill.iterations = default.distill.iterations
  assert levers.to_dict() == default.to_dict()
  by_variant = variants.variant_config("digits", variants.BY_NAME["default"])
  assert by_variant.to_dict() == default.to_dict()
  # The set of 9 stamped copies per pattern at the appended length is the default itself.
  assert variants.variant_config("digits", variants.BY_NAME["appended_set9"]).to_dict() == (
    default.to_dict()
  )
  # configs/digits_matching.py is the paper plus MATCHING_LEVERS, at the matching length.
  matching = config_loader.load(str(REPO / "configs" / "digits_matching.py"))
  as_variant = variants.variant_config("digits", variants.BY_NAME["matching"])
  assert as_variant.to_dict() == matching.to_dict()
  paper_variant = variants.variant_config("digits", variants.BY_NAME["paper"])
  paper.distill.iterations = matching.distill.iterations  # Matching variants at equal length.
  assert paper_variant.to_dict() == paper.to_dict()
  # Variants that only change distillation share the paper's or the matching default's experts.
  group = ablation.experts_group
  assert group(variants.variant_config("digits", variants.BY_NAME["beta0"])) == group(paper)
  assert group(as_variant) == group(
    variants.variant_config("digits", variants.BY_NAME["levers_fp_normal"])
  )
  assert group(by_variant) == group(paper) != group(as_variant)
  with pytest.raises(KeyError, match="distill.nope"):
    variants.with_fields(paper, {"distill.nope": 1})


def test_cifar_default_is_the_scale_down_plus_its_levers():
  paper = config_loader.load(str(REPO / "configs" / "cifar10_cpu_paper.py"))
  default = config_loader.load(str(REPO / "configs" / "cifar10_cpu.py"))
  assert paper.watermark.n_patterns == 10 and paper.distill.watermark_embedding == "matching"
  assert default.watermark.n_patterns == 7 and default.distill.carriers_per_pattern == 5
  levers = variants.with_fields(paper, variants.DEFAULT_LEVERS["cifar10_cpu"])
  assert levers.to_dict() == default.to_dict()
  by_variant = variants.variant_config("cifar10_cpu", variants.BY_NAME["default"])
  assert by_variant.to_dict() == default.to_dict()


def test_clean_label_variant_is_the_shipped_config():
  """The frontier's base variant is configs/digits_clean_label.py but for the fields that
  clean_label does not read (it carries the watermark in the set's own images)."""
  shipped = config_loader.load(str(REPO / "configs" / "digits_clean_label.py")).to_dict()
  variant = variants.variant_config("digits", variants.BY_NAME["clean_label"]).to_dict()
  differ = {
    f"{section}.{name}"
    for section, fields in shipped.items()
    if isinstance(fields, dict)
    for name, value in fields.items()
    if variant[section][name] != value
  }
  assert differ == {"distill.carriers_per_pattern", "distill.carrier_source"}
  for v in variants.CLEAN_LABEL_VARIANTS:  # Each changes one or two levers of the base.
    changed = {k for k, value in v.fields.items() if variants.CLEAN_LABEL.get(k) != value}
    assert 1 <= len(changed) <= 2 or v.name == "clean_label", v.name


def _argv(tmp_path, variants):
  return ["--root", str(tmp_path / "runs"), "--variants", variants, "--eval_seeds", "1"]


def _fake_report(seeds):
  stat = {"mean": 0.5, "std": 0.1, "runs": [0.5] * seeds}
  entry = {"acc": stat, "acc_w": stat, "verified": [True] * seeds, "p_values": [1e-9] * seeds}
  terms = ("loss", "expert_term", "twin_term", "direct_term")
  distilled = {f"{t}_{w}": 1.0 for t in terms for w in ("first", "last")}
  distilled.update(num_images=100, seconds=1.0, trigger_visibility={"mean": 0.5})
  return {
    "experts": {"seconds": 2.0},
    "distill": {"distilled": distilled},
    **{name: entry for name in ("distilled", "clean_distilled", "real")},
  }


def _fake_pipeline(calls: list):
  """A stand-in for pipeline.run that records (workdir name, stage) and writes what the
  ablation reads back: key, experts.json, attacks.json, the manifest, a report."""

  def fake_run(config, workdir, stage, key_file):
    calls.append((pathlib.Path(workdir).name, stage))
    workdir = pathlib.Path(workdir)
    if stage == "keygen" and not pathlib.Path(key_file).exists():
      watermark.write_key_file(pathlib.Path(key_file), watermark.generate_key())
    if stage == "experts":
      (workdir / "trajectories").mkdir(parents=True, exist_ok=True)
      kinds = embedding.expert_kinds(config.distill)
      reporting.write_json(workdir / "experts.json", {kind: {} for kind in kinds})
    if stage == "attacks":
      reporting.write_json(workdir / "attacks.json", {})
    if stage != "keygen":  # As pipeline.run: the manifest of the config the stage ran with.
      reporting.write_json(workdir / "manifest.json", {"fields": manifest.record(config, "k", 10)})
    return _fake_report(config.eval.num_seeds) if stage == "verify" else {}

  return fake_run


def test_variants_share_experts_and_finished_ones_are_skipped(tmp_path, monkeypatch, capsys):
  """The orchestration alone, over a stand-in for pipeline.run (no training)."""
  calls = []
  monkeypatch.setattr(ablation.pipeline, "run", _fake_pipeline(calls))
  argv = _argv(tmp_path, "paper,beta0,default,levers_fp_normal") + ["--tag", "t"]
  ablation.main(argv)
  runs = tmp_path / "runs"
  groups = sorted(p.name for p in runs.glob("experts_*"))
  assert len(groups) == 2  # The paper's (and the default's) experts, and the trigger-safe ones.
  # Each group's experts train once: the paper's first, so the (appended) default needs none.
  assert sorted(n for n, s in calls if s == "experts") == groups
  for name in ("paper", "beta0", "default", "levers_fp_normal"):
    assert (runs / name / "trajectories").is_symlink()
    assert [s for n, s in calls if n == name] == ["distill", "evaluate", "verify"]
  rows = json.loads((runs / "ablation.json").read_text())
  assert [r["variant"] for r in rows] == ["paper", "beta0", "default", "levers_fp_normal"]
  # Every output lies under the root; nothing beside it (nor in docs/).
  assert [p.name for p in tmp_path.iterdir()] == ["runs"]
  text = (runs / "ablation.md").read_text()
  assert text.startswith("## Ablation of the watermarked distillation's levers: digits (t)\n")
  assert "| beta0 | β 0 (no twin term) |" in text
  assert "| real | real data (from the paper run) |" in text
  assert text.rstrip().endswith("(ablation_digits_t.png)")
  assert (runs / "ablation_digits_t.png").stat().st_size > 0
  calls.clear()
  capsys.readouterr()
  ablation.main(argv)  # Finished variants are read back, not rerun.
  assert calls == [] and capsys.readouterr().err.count("finished earlier") == 4
  assert (runs / "ablation.md").read_text().count("## Ablation") == 1  # Rewritten, not appended.
  with pytest.raises(CCDDError, match="beta0 was made with other values of distill.lr_img"):
    ablation.main(_argv(tmp_path, "beta0") + ["--set", "distill.lr_img=50"])


def test_attacks_flag_runs_the_attacks_stage_once(tmp_path, monkeypatch):
  """--attacks: each variant's attacks stage after verify; a finished variant without
  attacks.json gets it on the next call; the frontier reads the finished variants back."""
  calls = []
  monkeypatch.setattr(ablation.pipeline, "run", _fake_pipeline(calls))
  ablation.main(_argv(tmp_path, "clean_label,clean_label_eps010"))
  assert ("clean_label", "attacks") not in calls
  calls.clear()
  ablation.main(_argv(tmp_path, "clean_label,clean_label_eps010") + ["--attacks"])
  assert calls == [("clean_label", "attacks"), ("clean_label_eps010", "attacks")]
  calls.clear()
  ablation.main(_argv(tmp_path, "clean_label") + ["--attacks"])
  assert calls == []
  root = tmp_path / "runs"
  found = stealth_frontier.runs(["appended=runs/x"], [str(root)])
  assert found == [
    ("appended", pathlib.Path("runs/x")),
    ("clean_label (runs)", root / "clean_label"),
    ("clean_label_eps010 (runs)", root / "clean_label_eps010"),
  ]
  with pytest.raises(SystemExit, match="no finished variant"):
    stealth_frontier.runs([], [str(root / "clean_label")])
  with pytest.raises(SystemExit, match="use LABEL=WORKDIR"):
    stealth_frontier.runs(["runs/x"], [])


def test_frontier_pictures_pair_each_carrier_with_its_own_clean_image():
  clean = {"labels": np.array([0, 0, 1, 1, 2])}
  appended = {"labels": np.r_[clean["labels"], [0, 0, 1]], "from_trigger": [0] * 5 + [1] * 3}
  carriers, same = stealth_frontier.pick_carriers(appended, clean)
  np.testing.assert_array_equal(carriers, [5, 7, 6])  # One per label first, then the rest.
  np.testing.assert_array_equal(same, [0, 2, 1])  # Label 0 twice: two different clean images.
  moved = {"labels": clean["labels"], "from_trigger": [1, 0, 1, 0, 1]}
  carriers, same = stealth_frontier.pick_carriers(moved, clean)
  np.testing.assert_array_equal(same, carriers)  # Every image moved: the same slots.


@pytest.mark.slow
def test_one_tiny_variant_end_to_end(tiny_run, tmp_path):
  """Distil, evaluate and verify one variant over the shared tiny run's experts (reused).

  The tiny run's own config but for the length: the same compiled programs (cached).
  """
  workdir, tiny, _ = tiny_run
  config = ml_collections.ConfigDict(tiny.to_dict())
  config.distill.iterations = 2
  seeds = config.eval.num_seeds
  root = tmp_path / "runs"
  root.mkdir()
  (root / f"experts_{ablation.experts_group(config)}").symlink_to(workdir)
  row = ablation.run_variant("default", config, root, workdir / "owner.key")
  assert (root / "default" / "trajectories").resolve() == (workdir / "trajectories").resolve()
  assert row["variant"] == "default" and row["iterations"] == 2 and row["seeds"] == seeds
  assert 0.0 <= row["acc"]["mean"] <= 1.0 and row["twin_term_first"] > 0.0  # Form (b), β 0.5.
  assert row["real"]["seeds"] == seeds and row["num_images"] >= 10 * config.distill.ipc
  # The tiny run's verdicts: all of the distilled set's networks verified, no clean or real one.
  assert row["verified"] == seeds, row
  assert row["clean_distilled"]["verified"] == row["real"]["verified"] == 0
  meta = dict.fromkeys(("command", "commit", "date", "machine", "python", "jax", "key"), "x")
  meta.update(eval_seeds=seeds, default_iterations=2, variant_iterations="matching 2")
  meta.update(iterations_scale=1.0)
  text = ablation_report.markdown("digits", [row], meta)
  assert "| default | default: " in text and "| real | real data" in text
  assert "(ablation_digits.png)" in text


def test_tradeoff_writes_its_table_and_plot(tmp_path):
  stat = lambda mean: {"mean": mean, "std": 0.01, "runs": [mean]}
  rows = [
    dict(
      sweep="lambda1",
      value=v,
      acc=stat(0.9 - v / 10),
      acc_w=stat(v / 2),
      verified=5,
      seeds=5,
      median_p=1e-10,
      expert_acc=0.93,
      expert_acc_w=0.9,
      clean_acc=0.943,
    )
    for v in (0.5, 1.0)
  ] + [
    dict(
      sweep="beta",
      value=0.0,
      acc=stat(0.85),
      acc_w=stat(0.7),
      verified=4,
      seeds=5,
      median_p=3e-7,
      expert_acc=None,
      expert_acc_w=None,
      clean_acc=0.943,
    ),
    dict(
      sweep="carriers",
      value=9,
      acc=stat(0.91),
      acc_w=stat(0.95),
      verified=5,
      seeds=5,
      median_p=1e-10,
      expert_acc=None,
      expert_acc_w=None,
      clean_acc=0.943,
      num_images=190,
    ),
  ]
  tradeoff.write_outputs(tmp_path, rows)
  table = (tmp_path / "tradeoff.md").read_text().splitlines()
  assert (
    table[2]
    == "| lambda1 | 0.5 | – | 85.0 ± 1.0% | 25.0 ± 1.0% | 5/5 | 1e-10 | 93.0 / 90.0 | 94.3% |"
  )
  assert table[4].startswith("| beta | 0 | – | 85.0 ± 1.0% | 70.0 ± 1.0% | 4/5 | 3e-07 | – |")
  assert table[5] == "| carriers | 9 | 190 | 91.0 ± 1.0% | 95.0 ± 1.0% | 5/5 | 1e-10 | – | 94.3% |"
  assert json.loads((tmp_path / "tradeoff.json").read_text()) == rows
  assert (tmp_path / "tradeoff.png").stat().st_size > 1000


def test_renamed_variants_exist_under_their_new_names_only():
  """docs/notebook/variant-names.md maps the notebook's old names onto the variants' names."""
  table = (REPO / "docs" / "notebook" / "variant-names.md").read_text()
  pairs = [
    [cell.strip().strip("`") for cell in line.strip("|").split("|")]
    for line in table.splitlines()
    if line.startswith("| `")
  ]
  assert len(pairs) == 8
  for old, new in pairs:
    assert old not in variants.BY_NAME and new in variants.BY_NAME, (old, new)
  assert not [v.name for v in variants.VARIANTS if v.name.startswith("default_")]
  for variant in variants.VARIANTS:  # Each levers_b_direct_* variant keeps levers_b_direct's.
    if variant.name.startswith("levers_b_direct_"):
      changed = {k for k, v in variants.LEVERS_B_DIRECT.items() if variant.fields[k] != v}
      assert changed <= {"distill.carriers_per_pattern"}, variant.name
