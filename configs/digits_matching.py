r"""Digits with the watermark matched into the images: the best trajectory-matching variant.

  python -m ccdd_jax.main --workdir runs/matching --config digits_matching

The paper's method (configs/digits_paper.py: a width-16, depth-2 ConvNet, 8 experts of each
kind x 20 epochs) with the watermark distilled into the images from watermarked experts, as in
the paper, plus the levers that measured best with it on digits (experiments/ablation.py). The
default (configs/digits.py) instead appends stamped carriers to a clean distilled set and is
more accurate at a higher Acc_W. The levers:
  * experts.trigger_safe_dsa: the stamped corner of D_W images bypasses DSA
    in expert training, so the experts learn the trigger that verification
    shows (crop, rotate, scale and cutout otherwise move or erase it);
  * eq. 10 in form (b) (distill.eq10_form = "second_student", beta = 1): a
    second student from the fine-pruning-enhanced twin's th^Idx_t, matched to
    its own expert (the literal twin term stays far above 0 and costs Acc);
    beta 1 measured better on average than 0.5, paired over four keys;
  * experts.fp_normal_last_epochs = 5: the enhanced experts' last 5 epochs
    are normal training (the paper's "last 10 epochs", scaled to 20 epochs);
  * distill.carriers_per_pattern = 4: 4 stamped carriers per pattern BEYOND
    the 100 IPC images (a set of 140 images; the set's size is reported);
  * distill.trigger_safe_dsa and distill.freeze_trigger: the stamped corner of
    the carriers and seeded slots stays out of DSA in eq. 9 and is never
    updated, so the distilled trigger stays the one verification stamps;
  * the direct objective (distill.gamma_wm = gamma_clean = 0.3): after the N
    student steps, 0.3 CE of the student on a D_W minibatch of the training
    split plus 0.3 CE on real training images, through the unrolled scan; it
    raised Acc at equal Acc_W, paired over three keys.
The trigger-safe distillation and form (b) raised Acc_W at the same Acc; the second student
adds to the watermarked set's distillation time. 300 distillation iterations keep the run to a
few minutes on 2 CPU cores; more iterations or more carriers per pattern raise Acc_W at more
cost. Learned soft labels, split roles and other lambda1 trade Acc for Acc_W or lose both.
Measured: docs/results.md, rows of "configs/digits_matching.py"; each lever alone and combined:
the digits ablation files of docs/notebook/ (index: docs/notebook/README.md).
Every field and its MTT default: ccdd_jax/config/schema.py.
"""

import pathlib

import ml_collections

from ccdd_jax.config import loader as config_loader


def get_config() -> ml_collections.ConfigDict:
  """The digits pipeline with the watermark matched into the images (eq. 10 form (b))."""
  config = config_loader.load(str(pathlib.Path(__file__).with_name("digits_paper.py")))
  config.unlock()
  config.experts.trigger_safe_dsa = True  # the trigger corner keeps out of DSA.
  config.experts.fp_normal_last_epochs = 5  # the paper's last epochs trained normally.

  config.distill.iterations = 300  # The run's length on 2 CPU cores (docs/results.md 1.1).
  config.distill.beta = 1.0  # Form (b) at beta 1: +1.0 Acc, +1.3 Acc_W over 0.5 (4 keys, 9.4).
  config.distill.eq10_form = "second_student"  # form (b), each student its own expert.
  config.distill.carriers_per_pattern = 4  # 40 carriers beyond the 100 IPC images.
  config.distill.trigger_safe_dsa = True  # the carriers' corner keeps out of DSA ...
  config.distill.freeze_trigger = True  # ... and out of the image updates.
  config.distill.gamma_wm = 0.3  # the direct watermark objective ...
  config.distill.gamma_clean = 0.3  # ... with a clean term that protects Acc.
  return config
