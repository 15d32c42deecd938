r"""The embedded default: scikit-learn's 8x8 digits, IPC 10, on 2 CPU cores.

  python -m ccdd_jax.main --workdir runs/demo                # this config
  python -m ccdd_jax.main --workdir runs/demo --config.distill.ipc=1

A width/depth-reduced ConvNet (width 16, depth 2) keeps the whole pipeline
(three expert kinds, two distillations, 3 x 5 evaluation networks) within
five minutes on 2 CPU cores. Every field and its MTT default: ccdd_jax/settings.py.
"""

import ml_collections

from ccdd_jax import settings


def get_config() -> ml_collections.ConfigDict:
  """Default configuration for the digits pipeline."""
  config = settings.base_config()
  config.data.name = "digits"

  config.model.width = 16
  config.model.depth = 2

  config.watermark.queries_per_pattern = 30

  config.experts.num_experts = 8
  # On 2 CPU cores: one expert per program, two programs at once (fastest).
  config.experts.group_size = 1
  config.experts.epochs = 20
  # MTT uses 0.01 on CIFAR; 8x8 digits need 0.05 to reach ~95% in 20 epochs.
  config.experts.lr = 0.05
  config.experts.batch_size = 64
  config.experts.wm_batch_size = 16
  config.experts.prune_examples = 256

  config.distill.iterations = 200  # What 5 minutes on 2 CPU cores allow.
  config.distill.max_start_epoch = 10
  config.distill.lr_teacher = 0.05  # Initial alpha of eq. 9 = the experts' lr.
  config.distill.triggers_per_pattern = 1

  config.eval.epochs = 300
  config.eval.real_epochs = 30
  config.eval.real_batch_size = 64
  return config
