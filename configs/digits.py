r"""The embedded default: scikit-learn's 8x8 digits, IPC 10, on 2 CPU cores.

  python -m ccdd_jax.main --workdir runs/demo                # this config
  python -m ccdd_jax.main --workdir runs/demo --config.distill.ipc=1
  python -m ccdd_jax.main --workdir runs/paper --config configs/digits_paper.py  # the paper

A width/depth-reduced ConvNet (width 16, depth 2), 8 clean experts x 20
epochs, and the watermark NOT distilled into the images (issue 10; beyond the
paper): `distill.watermark_embedding = "appended"`. The watermarked set is
the clean distilled set (MTT over the clean experts, 600 iterations: the
time a watermarked distillation would take goes to the clean one) plus 9
carriers per pattern beyond IPC, each a copy of one of its own distilled
images of another class (`carrier_source = "set"`: no raw training image
leaves with the set) with the pattern stamped on the corner and labelled y_i;
the carriers are never distilled, and no watermarked or enhanced expert is
trained. 190 images instead of 100; the set's size is reported beside its
figures.
Over three fresh keys: Acc 90.4%, Acc_W 97.0%, verified 15/15 (89.8 / 96.2
over five), against 94.3% for the clean distilled set alone (docs/results.md
1.0); the best variant that distils the watermark into the images
(configs/digits_matching.py) reached 84.8 / 81.2, the paper-literal method
(configs/digits_paper.py) 74 / 57. Fewer carriers trade Acc_W for Acc (3:
91.9 / 53.4, 7: 91.9 / 94.8; docs/results.md 3 and 9.5). The price: carriers
whose content contradicts their labels can be found by a pirate with a clean
model of its own (the "disagreement" and "corner" cleansers remove the
watermark at 30% dropped; docs/results.md 12.5); the disagreement cleanser
removes the matching variant's at 30% too. 7 patterns instead of 10
(--config.watermark.n_patterns=7) give +1.9 Acc over five keys but fail
verification under attack more often (docs/results.md 11.8); the default
keeps the paper's 10.
Every field and its MTT default: ccdd_jax/settings.py.
"""

import pathlib

import ml_collections

from ccdd_jax import config_loader


def get_config() -> ml_collections.ConfigDict:
  """Default configuration for the digits pipeline: configs/digits_paper.py, appended."""
  config = config_loader.load(str(pathlib.Path(__file__).with_name("digits_paper.py")))
  config.unlock()
  # Issue 10: the watermark as carriers appended to the clean distilled set
  # (docs/results.md 1): only clean experts are trained, and the distillation
  # time that the watermarked set no longer needs goes to the clean one.
  config.distill.watermark_embedding = "appended"
  config.distill.triggers_per_pattern = 0  # No seeded slots: the carriers carry the trigger.
  config.distill.carriers_per_pattern = 9  # One per other class: 90 carriers beyond 100 images.
  config.distill.carrier_source = "set"  # Stamped copies of its distilled images: no raw data.
  config.distill.iterations = 600
  return config
