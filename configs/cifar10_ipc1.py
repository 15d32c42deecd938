r"""CIFAR-10, 1 image(s) per class: one cell of the paper's Table 1.

Hyperparameters: ccdd_jax/config/schema.py (MTT's per-setting values, the paper's
watermark settings). Data from TFDS prepared offline, or an image folder:

  python -m ccdd_jax.main --config configs/cifar10_ipc1.py --workdir runs/cifar10_ipc1 \
      --config.data.tfds_data_dir ~/tensorflow_datasets
"""

from ccdd_jax.config import paper


def get_config():
  """Config of CIFAR-10 at IPC 1."""
  return paper.paper_config("cifar10", 1)
