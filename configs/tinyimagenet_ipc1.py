r"""Tiny ImageNet, 1 image(s) per class: one cell of the paper's Table 1.

Hyperparameters: ccdd_jax/config/schema.py (MTT's per-setting values, the paper's
watermark settings). Data from TFDS prepared offline, or an image folder:

  python -m ccdd_jax.main --config configs/tinyimagenet_ipc1.py --workdir runs/tinyimagenet_ipc1 \
      --config.data.root /data/tiny-imagenet-200
"""

from ccdd_jax.config import paper


def get_config():
  """Config of Tiny ImageNet at IPC 1."""
  return paper.paper_config("tinyimagenet", 1)
