r"""CIFAR-10 IPC 10 on 2 CPU cores, the watermark appended (issue 10): the CIFAR-10 default.

  python -m ccdd_jax.main --config configs/cifar10_cpu.py --workdir runs/cifar10_cpu

configs/cifar10_cpu_paper.py (the paper-literal method, scaled down to run
end to end in under 30 minutes on 2 CPU cores; its docstring lists every
reduction) with the embedding of the digits default (configs/digits.py),
beyond the paper:
  * distill.watermark_embedding = "appended": the clean distilled set (MTT over
    the clean experts only; no watermarked or enhanced expert is trained) plus
    stamped carriers beyond IPC, never distilled;
  * distill.carrier_source = "set", carriers_per_pattern = 5: each carrier a
    copy of one of the set's own distilled images of another class, stamped
    with the pattern and labelled y_i (5 per pattern: 91-92% Acc_W, 4: 77%;
    docs/results.md 10.2);
  * watermark.n_patterns = 7 instead of the paper's 10: 35 carriers instead of
    50 (135 images), since each carrier costs Acc. Seven is the fewest with a
    margin under alpha: no p-value falls below 10^-n, so n = 5 can never be
    verified at alpha = 1e-6 and n = 6 only when every pattern is perfect.
Over three fresh keys (docs/results.md 10.3) this set lost 1.5 points of Acc
against the clean distilled set (31.2 against 32.7%) at 92.2% Acc_W, 15/15
verified; over six keys 1.7 at 91.6% (one key 86.8%). With the paper's 10
patterns it lost 3.1. The price of 7 patterns: a p floor of 1e-7 instead of
1e-10, so attacks that spoil a few patterns fail verification sooner
(results.md 11.8, measured on digits).
"""

import pathlib

import ml_collections

from ccdd_jax import config_loader


def get_config() -> ml_collections.ConfigDict:
  """configs/cifar10_cpu_paper.py with 7 patterns of 5 appended carriers each."""
  config = config_loader.load(str(pathlib.Path(__file__).with_name("cifar10_cpu_paper.py")))
  config.unlock()
  config.watermark.n_patterns = 7
  config.distill.watermark_embedding = "appended"
  config.distill.triggers_per_pattern = 0
  config.distill.carrier_source = "set"
  config.distill.carriers_per_pattern = 5
  return config
