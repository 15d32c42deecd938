"""The paper's settings table: CIFAR-10/100 and Tiny ImageNet at IPC 1/10/50.

Distillation hyperparameters are the MTT author's per-setting values as
recorded by DC-BENCH (syn_steps, expert_epochs, max_start_epoch, lr_img,
lr_lr, lr_teacher, batch_syn); the watermark settings are the CCDD paper's
("Further Details": n = 10 on CIFAR-10, n = 5 on CIFAR-100 and Tiny
ImageNet, |D_W| / |D_C| = 0.1, patch = half the image side) with the paper's
own embedding ("matching"). ZCA is off, as the CCDD paper argues it does not
suit a pixel-space trigger; MTT whitened where `MTT_ZCA` says so
(`--config.data.zca=True` follows MTT there). The MTT reference trains 100
experts x 50 epochs with SGD lr 0.01 and evaluates for 1000 epochs; the CCDD
weights lambda1..3 and beta were found by grid search in the paper and not
published, so the values here are starting points.
"""

import ml_collections

from ccdd_jax.config import schema

# (dataset, ipc) -> (syn_steps, expert_epochs, max_start_epoch, lr_img, lr_lr,
#                    lr_teacher, batch_syn); batch_syn 0 = the whole set.
MTT_SETTINGS = {
  ("cifar10", 1): (50, 2, 2, 100.0, 1e-7, 0.01, 0),
  ("cifar10", 10): (30, 2, 20, 100.0, 1e-5, 0.001, 0),
  ("cifar10", 50): (30, 2, 40, 1000.0, 1e-5, 0.001, 0),
  ("cifar100", 1): (20, 3, 20, 1000.0, 1e-5, 0.01, 0),
  ("cifar100", 10): (20, 2, 20, 1000.0, 1e-5, 0.01, 0),
  ("cifar100", 50): (80, 2, 40, 1000.0, 1e-5, 0.01, 125),
  ("tinyimagenet", 1): (10, 2, 10, 1e4, 1e-4, 0.01, 0),
  ("tinyimagenet", 10): (20, 2, 40, 1e4, 1e-4, 0.01, 200),
  ("tinyimagenet", 50): (20, 2, 40, 1e4, 1e-4, 0.01, 300),
}


# (dataset, ipc) -> whether MTT used ZCA whitening (DC-BENCH's record).
MTT_ZCA = {
  ("cifar10", 1): True,
  ("cifar10", 10): True,
  ("cifar10", 50): False,
  ("cifar100", 1): True,
  ("cifar100", 10): False,
  ("cifar100", 50): True,
  ("tinyimagenet", 1): False,
  ("tinyimagenet", 10): False,
  ("tinyimagenet", 50): False,
}


# dataset -> (data.name, n_patterns, ConvNet depth)
DATASETS = {
  "cifar10": ("tfds:cifar10", 10, 3),
  "cifar100": ("tfds:cifar100", 5, 3),
  "tinyimagenet": ("tinyimagenet", 5, 4),
}


def paper_config(dataset: str, ipc: int) -> ml_collections.ConfigDict:
  """The full config of one cell of the paper's Table 1."""
  if (dataset, ipc) not in MTT_SETTINGS:
    raise ValueError(f"no paper setting for {dataset} IPC {ipc}")
  syn_steps, expert_epochs, max_start, lr_img, lr_lr, lr_teacher, batch_syn = MTT_SETTINGS[
    (dataset, ipc)
  ]
  data_name, n_patterns, depth = DATASETS[dataset]
  config = schema.base_config()
  config.data.name = data_name  # Or "folder" with data.root = an image-folder tree / .tar.gz.
  config.model.depth = depth
  config.data.zca = False  # The CCDD paper; MTT_ZCA[(dataset, ipc)] is MTT's choice.
  config.watermark.n_patterns = n_patterns
  # The paper's embedding: the watermark distilled into the images (eq. 10), no carrier.
  config.distill.watermark_embedding = "matching"
  config.distill.carriers_per_pattern = 0
  config.distill.carrier_source = "train"
  d = config.distill
  d.ipc = ipc
  d.syn_steps, d.expert_epochs, d.max_start_epoch = syn_steps, expert_epochs, max_start
  d.lr_img, d.lr_lr, d.lr_teacher, d.batch_syn = lr_img, lr_lr, lr_teacher, batch_syn
  return config
