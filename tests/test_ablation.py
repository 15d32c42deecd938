"""launch/ablation.py: every variant's config validates, the results section, one tiny run."""

import importlib.util
import json

from conftest import REPO
import pytest

from ccdd_jax import config_loader
from ccdd_jax import settings

_spec = importlib.util.spec_from_file_location("ablation", REPO / "launch" / "ablation.py")
ablation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ablation)


@pytest.mark.parametrize("setting", sorted(ablation.SETTINGS))
def test_every_variant_builds_a_valid_config(setting):
  default = ablation.default_config(setting)
  for variant in ablation.VARIANTS:
    config = ablation.variant_config(setting, variant, iterations_scale=0.5, eval_seeds=5)
    settings.validate(config)
    expected = max(1, round(default.distill.iterations * 0.5 * variant.iterations_factor))
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
  # The default is the paper-literal config plus DEFAULT_LEVERS (and its own iterations).
  levers = ablation._set(config_loader.load(str(REPO / "configs" / "digits_paper.py")), {})
  levers = ablation._set(levers, ablation.DEFAULT_LEVERS)
  levers.distill.iterations = default.distill.iterations
  assert levers.to_dict() == default.to_dict()
  by_variant = ablation.variant_config("digits", ablation.BY_NAME["default"])
  assert by_variant.to_dict() == default.to_dict()
  paper_variant = ablation.variant_config("digits", ablation.BY_NAME["paper"])
  paper.distill.iterations = default.distill.iterations  # All variants at equal length.
  assert paper_variant.to_dict() == paper.to_dict()
  # Variants that only change distillation share the paper's or the default's experts.
  group = ablation.experts_group
  assert group(ablation.variant_config("digits", ablation.BY_NAME["beta0"])) == group(paper)
  assert group(by_variant) == group(
    ablation.variant_config("digits", ablation.BY_NAME["levers_direct"])
  )
  assert group(by_variant) != group(paper)
  with pytest.raises(KeyError, match="distill.nope"):
    ablation._set(paper, {"distill.nope": 1})


def test_replace_section_touches_only_its_own_section():
  begin, end = ablation.markers("digits")
  other_begin, other_end = ablation.markers("cifar10_cpu")
  text = (
    f"# Results\n\nintro\n\n{begin}\nold table\n{end}\n\n{other_begin}\nkeep\n{other_end}\ntail\n"
  )
  new = ablation.replace_section(text, "digits", "new table\n")
  assert new == text.replace("old table", "new table")
  assert ablation.replace_section(new, "digits", "new table") == new  # Idempotent.
  appended = ablation.replace_section("# Results\n", "tinyimagenet", "rows")
  assert appended.startswith("# Results\n\n<!-- ablation:tinyimagenet:begin -->\nrows\n")
  assert appended.endswith("<!-- ablation:tinyimagenet:end -->\n")


TINY = (
  "model.width=8",
  "experts.num_experts=2",
  "experts.epochs=3",
  "distill.iterations=2",
  "distill.syn_steps=2",
  "distill.max_start_epoch=1",
  "distill.ipc=2",
  "distill.triggers_per_pattern=0",
  "eval.epochs=2",
  "eval.real_epochs=1",
  "watermark.queries_per_pattern=10",
)


def test_tiny_ablation_shares_experts_and_resumes(tmp_path, capsys):
  results = tmp_path / "results.md"
  results.write_text("# Results\n\nkept\n")
  argv = [
    "--root",
    str(tmp_path / "runs"),
    "--variants",
    "paper,beta0",
    "--eval_seeds",
    "1",
    "--results",
    str(results),
    "--plot",
    str(tmp_path / "ablation.png"),
  ]
  for field in TINY:
    argv += ["--set", field]
  ablation.main(argv)
  runs = tmp_path / "runs"
  assert len(list(runs.glob("experts_*"))) == 1  # beta0 reused the paper's experts.
  assert (runs / "beta0" / "trajectories").is_symlink()
  rows = json.loads((runs / "ablation.json").read_text())
  assert [r["variant"] for r in rows] == ["paper", "beta0"]
  for r in rows:
    assert r["iterations"] == 2 and r["seeds"] == 1 and 0 <= r["acc"]["mean"] <= 1
  assert rows[1]["twin_term_first"] == 0.0 and rows[0]["twin_term_first"] > 0.0
  text = results.read_text()
  assert text.startswith("# Results\n\nkept\n") and "| beta0 | β 0 (no twin term) |" in text
  assert (tmp_path / "ablation.png").stat().st_size > 0
  capsys.readouterr()
  ablation.main(argv)  # Finished variants are read back, not rerun.
  assert capsys.readouterr().err.count("finished earlier") == 2
