"""experiments/forged_keys.py: the forged keys, the claims table and its outputs under --out."""

import json

import numpy as np

from experiments import forged_keys


def test_forged_keys_are_fixed_and_distinct():
  keys = {forged_keys.forged_key(0, i) for i in range(50)}
  assert len(keys) == 50 and all(len(k) == 32 for k in keys)
  assert (
    forged_keys.forged_key(0, 3) == forged_keys.forged_key(0, 3) != forged_keys.forged_key(1, 3)
  )


def test_writes_the_table_json_and_plot_under_out(tmp_path):
  p = np.linspace(1e-3, 1.0, 40)
  rows = [
    {
      "group": forged_keys.group_of(arch, "distilled", "convnet"),
      "p_value": float(v),
      "p_value_majority": float(min(1.0, 2 * v)),
    }
    for arch, v in zip(["convnet", "resnet"] * 20, p)
  ]
  owner = [{"verified": True, "p_value": 1e-10}, {"verified": False, "p_value": 1e-3}]
  out = tmp_path / "out"
  text = forged_keys.write_outputs(out, rows, owner, "40 pairs", 1.5)
  assert sorted(f.name for f in out.iterdir()) == [
    "forged_keys.json",
    "forged_keys.md",
    "forged_keys.png",
  ]
  assert (out / "forged_keys.md").read_text() == text + "\n"
  lines = text.splitlines()
  assert lines[2].startswith("| distilled (watermarked, other keys), distillation model | 20 | 0 |")
  # p = 1e-3 is the only claim at 1e-2 (convnet's first pair); 2 of 40 at 5e-2.
  assert lines[4].startswith("| all forged pairs | 40 | 0 | 1 (2.5%) | 2 (5.0%) |")
  assert lines[-1].startswith("Power check, the owner's key on the watermarked-distilled")
  assert "verified 1/2" in lines[-1]
  summary = json.loads((out / "forged_keys.json").read_text())
  assert summary["seconds"] == 1.5 and summary["owner_key"] == owner
  assert [e["pairs"] for e in summary["table"]] == [20, 20, 40]
  assert (
    len(summary["p_values"]["distilled (watermarked, other keys), other architectures"]["p_value"])
    == 20
  )
  assert (out / "forged_keys.png").stat().st_size > 1000
