r"""The embedded default: scikit-learn's 8x8 digits, IPC 10, on 2 CPU cores.

  python -m ccdd_jax.main --workdir runs/demo                # this config
  python -m ccdd_jax.main --workdir runs/demo --config.distill.ipc=1

A width/depth-reduced ConvNet (width 16, depth 2) keeps the whole pipeline
(three expert kinds, two distillations, 3 x 5 evaluation networks) within
five minutes on 2 CPU cores.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Default configuration for the digits pipeline."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"
  config.data.test_fraction = 0.2
  config.data.split_seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "convnet"
  config.model.width = 16
  config.model.depth = 2
  config.model.norm = "instance"
  config.model.conv_impl = "auto"  # im2col on CPU, lax convolutions on GPU/TPU.

  # DSA as in the MTT reference (one family per call, per-sample parameters).
  config.dsa = ml_collections.ConfigDict()
  config.dsa.strategy = "color_crop_cutout_flip_scale_rotate"

  config.watermark = ml_collections.ConfigDict()
  config.watermark.n_patterns = 10
  config.watermark.patch_size = 0  # 0: half the image side (paper, Stage I).
  config.watermark.ratio = 0.1  # |D_W| / |D_C| (paper, "Further Details").
  config.watermark.queries_per_pattern = 30  # m held-out test images per pattern.
  config.watermark.alpha = 1e-6  # Significance level, fixed in advance.

  config.experts = ml_collections.ConfigDict()
  config.experts.num_experts = 8
  config.experts.epochs = 20
  config.experts.lr = 0.05  # MTT uses 0.01 on CIFAR; 8x8 digits need 0.05 to reach ~95% in 20 epochs.
  config.experts.momentum = 0.0
  config.experts.batch_size = 64
  config.experts.wm_batch_size = 16  # D_W minibatch drawn beside each D_C minibatch.
  config.experts.lambda1 = 1.0  # eq. 6: weight of the D_W loss.
  config.experts.lambda2 = 0.0  # eq. 6: weight of ||theta - theta0||^2.
  config.experts.lambda3 = 1.0  # eq. 8: weight of the fine-pruned model's D_W loss.
  config.experts.prune_ratio = 0.5  # Channels of the last conv layer pruned for eq. 7.
  config.experts.prune_examples = 256  # Clean images that rank the channels.

  config.distill = ml_collections.ConfigDict()
  config.distill.ipc = 10
  config.distill.iterations = 200
  config.distill.syn_steps = 20  # N in eq. 9.
  config.distill.expert_epochs = 2  # M, in epochs.
  config.distill.max_start_epoch = 10
  config.distill.lr_img = 100.0
  config.distill.lr_lr = 1e-5
  config.distill.lr_teacher = 0.05  # Initial alpha of eq. 9 = the experts' lr.
  config.distill.batch_syn = 0  # 0: the whole synthetic set each step.
  config.distill.beta = 0.5  # eq. 10: weight of the fine-pruning-enhanced twin.
  # Beyond the paper: k slots of class y_i start as D_W images (0 = the paper).
  config.distill.triggers_per_pattern = 1

  config.eval = ml_collections.ConfigDict()
  config.eval.num_seeds = 5
  config.eval.epochs = 300
  config.eval.batch_size = 256
  config.eval.momentum = 0.9
  config.eval.weight_decay = 5e-4
  # The real-data baseline: the same optimiser on all of D_C.
  config.eval.real_epochs = 30
  config.eval.real_lr = 0.01
  config.eval.real_batch_size = 64
  return config
