"""The paper's settings (CIFAR-10/100, Tiny ImageNet at IPC 1/10/50) as configs.

Distillation hyperparameters are the MTT author's per-setting values as
recorded by DC-BENCH (syn_steps, expert_epochs, max_start_epoch, lr_img,
lr_lr, lr_teacher, batch_syn); the watermark settings are the CCDD paper's
("Further Details": n = 10 on CIFAR-10, n = 5 on CIFAR-100 and Tiny
ImageNet, |D_W| / |D_C| = 0.1, patch = half the image side). ZCA is off, as
the CCDD paper argues it does not suit a pixel-space trigger; MTT whitened
where `MTT_ZCA` says so (`--config.data.zca=True` follows MTT there). The MTT
reference trains 100 experts x 50 epochs with SGD lr 0.01 and evaluates for
1000 epochs; the CCDD weights lambda1..3 and beta were found by grid search
in the paper and not published, so the values here are starting points.
"""

import ml_collections

from ccdd_jax import CCDDError

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

# The forms of eq. 10 (distill.eq10_form; issue 10): the paper's first.
EQ10_FORMS = ("literal", "second_student", "student_normalised")
# How the watermark enters the distilled set (distill.watermark_embedding; issue 10).
WATERMARK_EMBEDDINGS = ("matching", "appended")
# How the distilled set's labels start (distill.soft_labels): "" = hard labels, not learned.
SOFT_LABELS = ("", "one_hot", "expert")

# dataset -> (data.name, n_patterns, ConvNet depth)
DATASETS = {
  "cifar10": ("tfds:cifar10", 10, 3),
  "cifar100": ("tfds:cifar100", 5, 3),
  "tinyimagenet": ("tinyimagenet", 5, 4),
}


def base_config() -> ml_collections.ConfigDict:
  """Every config field with the MTT reference's defaults; configs override values."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Independent programs run at once (expert groups, the two distilled sets):
  # 0 = one per CPU core on CPU (XLA:CPU keeps about one core busy per small
  # program, docs/performance.md), 1 on GPU/TPU. Never changes a result.
  config.concurrency = 0
  # Devices the stages spread over (sharding.py): 0 = every device of every
  # process. Experts' and evaluation's seeds axes and the distillation
  # minibatch are split over them; results equal one device's to float32
  # rounding (bitwise on one device). main.py's --num_devices sets it.
  config.num_devices = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits"  # digits | folder | tinyimagenet | tfds:<name>
  config.data.root = ""  # An image-folder tree / .tar.gz, or the Tiny ImageNet root.
  config.data.tfds_data_dir = ""
  config.data.image_size = 0  # 0: keep the images' own size.
  config.data.train_subset_per_class = 0  # 0: all; k: the first k files per class.
  config.data.test_subset_per_class = 0
  config.data.cache_dir = ""  # "": ~/.cache/ccdd_jax (decoded uint8 .npz).
  config.data.test_fraction = 0.2  # Only used by data sets without a test split.
  config.data.split_seed = 0
  # The attacker's clean data for --stage=attacks: this fraction of each
  # training class, held out of everything the owner trains on (experts,
  # distillation, the real-data baseline). 0 = none (no attacks stage).
  config.data.attacker_fraction = 0.1
  # ZCA whitening of [0, 1] pixels (MTT: kornia ZCAWhitening, eps 0.1) instead of
  # mean/std normalisation; triggers are stamped before it, as before normalisation.
  config.data.zca = False
  config.data.zca_eps = 0.1

  config.model = ml_collections.ConfigDict()
  config.model.name = "convnet"
  config.model.width = 128
  config.model.depth = 3
  config.model.norm = "instance"
  config.model.conv_impl = "auto"  # shift (matmul) convolutions on CPU, lax on GPU/TPU.

  # DSA as in the MTT reference (one family per call, per-sample parameters).
  config.dsa = ml_collections.ConfigDict()
  config.dsa.strategy = "color_crop_cutout_flip_scale_rotate"

  config.watermark = ml_collections.ConfigDict()
  config.watermark.n_patterns = 10
  config.watermark.patch_size = 0  # 0: half the image side (paper, Stage I).
  config.watermark.ratio = 0.1  # |D_W| / |D_C| (paper, "Further Details").
  config.watermark.queries_per_pattern = 100  # m held-out test images per pattern.
  config.watermark.alpha = 1e-6  # Significance level, fixed in advance.

  config.experts = ml_collections.ConfigDict()
  config.experts.num_experts = 100
  config.experts.epochs = 50
  config.experts.lr = 0.01
  config.experts.momentum = 0.0
  config.experts.batch_size = 256
  config.experts.wm_batch_size = 26  # D_W minibatch beside each D_C minibatch (~ratio 0.1).
  config.experts.lambda1 = 1.0  # eq. 6: weight of the D_W loss.
  config.experts.lambda2 = 0.0  # eq. 6: weight of ||theta - theta0||^2.
  config.experts.lambda3 = 1.0  # eq. 8: weight of the fine-pruned model's D_W loss.
  config.experts.prune_ratio = 0.5  # Channels of the last conv layer pruned for eq. 7.
  config.experts.prune_examples = 2500  # Clean images that rank the channels (5% of CIFAR).
  # Issue 10, beyond the paper: the stamped corner of D_W images bypasses DSA
  # (augment.augment_keeping), so experts learn the trigger verification shows.
  config.experts.trigger_safe_dsa = False
  # The paper's "last 10 epochs ... as the normal model training": the fp-enhanced
  # experts drop eq. 8's term in their last k epochs (0 = eq. 8 throughout).
  config.experts.fp_normal_last_epochs = 0
  # Experts per vmapped program (0 = all): it sets the float rounding, and memory grows with it.
  config.experts.group_size = 0

  config.distill = ml_collections.ConfigDict()
  config.distill.ipc = 10
  config.distill.iterations = 5000
  config.distill.syn_steps = 20  # N in eq. 9.
  config.distill.expert_epochs = 2  # M, in epochs.
  config.distill.max_start_epoch = 20
  config.distill.lr_img = 100.0
  config.distill.lr_lr = 1e-5
  config.distill.lr_teacher = 0.01  # Initial alpha of eq. 9.
  config.distill.batch_syn = 0  # 0: the whole synthetic set each step.
  config.distill.beta = 0.5  # eq. 10: weight of the fine-pruning-enhanced twin.
  # Beyond the paper: k slots of class y_i start as D_W images (0 = the paper).
  config.distill.triggers_per_pattern = 0
  # How the watermark enters the set: "matching" (the paper: the set is distilled
  # against watermarked experts, eq. 10, with the levers below) or "appended"
  # (beyond the paper, issue 10): the clean distilled set (MTT over clean experts
  # only) plus carriers_per_pattern stamped carriers per pattern (labels y_i) that
  # are never distilled; only clean experts are trained, and the fields of the
  # watermarked distillation (beta, eq10_form, gamma_*, clean_expert_fraction,
  # split_roles, freeze_trigger, trigger_safe_dsa, experts.lambda*) do not apply.
  config.distill.watermark_embedding = "matching"
  # Issue 10 levers (the defaults are the paper's eq. 10 as before):
  # eq. 10's form: "literal" (the paper), "second_student" (a second student from
  # th^Idx_t on the same minibatches, measured against its own expert), or
  # "student_normalised" (the beta term over ||th*_t - th^Idx_{t+M}||^2).
  config.distill.eq10_form = "literal"
  # Probability that an iteration matches a clean expert (beta term off) instead
  # of a watermarked one: the paper's pool of both kinds (0 = watermarked only).
  config.distill.clean_expert_fraction = 0.0
  # Beyond the paper, with the pool: the trigger slots (carriers, seeded slots) learn
  # only on watermarked iterations and the class images only on clean ones.
  config.distill.split_roles = False
  # k stamped training images per pattern (label y_i) added BEYOND the IPC images.
  config.distill.carriers_per_pattern = 0
  # Where carriers come from: "train" (training images) or "set" (stamped copies of
  # the set's own real slots, i.e. image/carrier pairs; with "appended": of its
  # distilled class images).
  config.distill.carrier_source = "train"
  # Stamped corner of trigger slots and carriers: never updated (freeze_trigger) /
  # kept out of DSA in eq. 9 (trigger_safe_dsa).
  config.distill.freeze_trigger = False
  config.distill.trigger_safe_dsa = False
  # Direct objective after the N student steps: gamma_wm * CE(th_N(D_W batch), y_i)
  # with D_W from the training split + gamma_clean * CE on a clean training batch,
  # batches of objective_batch images, without augmentation.
  config.distill.gamma_wm = 0.0
  config.distill.gamma_clean = 0.0
  config.distill.objective_batch = 64
  # Learned soft labels (TESLA / DATM): "" = hard labels (the paper); "one_hot" =
  # logits label_logit_scale * one_hot(y); "expert" = the logits of the set's first
  # expert at epoch max_start_epoch + expert_epochs on the initial images (DATM).
  # The logits are learned through eq. 10 with SGD (lr_label, momentum 0.5); the
  # evaluation trains on their softmax. With freeze_trigger, trigger slots' stay.
  config.distill.soft_labels = ""
  config.distill.lr_label = 2.0
  config.distill.label_logit_scale = 5.0
  # Speed and memory only; both give the same numbers up to float rounding.
  # Scan steps of eq. 9 per loop iteration: "auto" (per backend, see
  # inner_loop.resolve_unroll), "full", or a count ("1" = rolled).
  config.distill.unroll = "auto"
  # What the backward pass through eq. 9 stores (inner_loop.REMAT_POLICIES):
  # "none" every activation, "full" one params vector per step (17x less
  # memory, no slower on CPU), "dots", "nested" (~2 sqrt(N) params vectors:
  # memory nearly flat in syn_steps, 1.1-1.2x the time), or "auto" (the
  # default: "nested" where the params vector is large against one step's
  # activations, as at IPC 1 on CIFAR, else "full").
  config.distill.remat = "auto"
  # Resume: the distillation state (images, lr, optimiser, PRNG, iteration) is
  # saved every this many iterations (Orbax, <workdir>/resume/); 0 = only at the end.
  # Checkpoints never change a result; a non-finite loss is caught at each one.
  config.distill.checkpoint_every = 50

  config.eval = ml_collections.ConfigDict()
  config.eval.num_seeds = 5
  # Architectures trained on the distilled sets (paper Table 4), comma-separated
  # from convnet, resnet18, vgg11, alexnet, each optionally ":instance" / ":batch"
  # / ":none" (norm); "" = the distillation model only.
  config.eval.models = ""
  config.eval.width = 0  # ResNet18/VGG11 width; 0 = DC's 64 (smaller: quick CPU checks).
  config.eval.real_all_models = False  # Real-data baseline for every architecture.
  config.eval.epochs = 1000
  config.eval.batch_size = 256
  config.eval.momentum = 0.9
  config.eval.weight_decay = 5e-4
  # The real-data baseline: the same optimiser on all of D_C.
  config.eval.real_epochs = 50
  config.eval.real_lr = 0.01
  config.eval.real_batch_size = 256

  # --stage=attacks (threats.py, attacks.py): removal attacks on the networks
  # `evaluate` trained for the distillation model, each verified with the
  # owner's key. Run only when asked, after evaluate (never by --stage=all).
  # The attacker's clean data is data.attacker_fraction of the training split.
  # Strengths are comma-separated lists; "" skips that attack.
  config.attacks = ml_collections.ConfigDict()
  config.attacks.sets = "distilled,clean_distilled,real"  # Which evaluated sets are attacked.
  config.attacks.num_seeds = 0  # The first k networks of each set (0 = all eval.num_seeds).
  # SGD of every training attack: constant lr, batches of the attacker's data,
  # augmented with the run's DSA where `dsa` is True.
  config.attacks.lr = 0.01
  config.attacks.momentum = 0.9
  config.attacks.weight_decay = 5e-4
  config.attacks.batch_size = 64
  config.attacks.dsa = True
  config.attacks.fine_tune_epochs = "1,5,20,50"  # FT, all layers and last layer only.
  config.attacks.prune_ratios = "0.1,0.3,0.5,0.7,0.9"  # NP: last conv channels cut.
  config.attacks.fine_prune_ratios = "0.5,0.7,0.9"  # FP: NP at each ratio, then FT ...
  config.attacks.fine_prune_epochs = 10  # ... of all layers for this many epochs.
  config.attacks.overwrite_epochs = "10,50,100"  # Table 3: a new key's D_W fine-tuned in.
  config.attacks.overwrite_ratio = 0.5  # The new key's |D_W| / |attacker data|.
  config.attacks.extraction_epochs = "30,100,300"  # A fresh network on soft labels.
  config.attacks.extraction_lr = 0.01
  config.attacks.jpeg_qualities = "90,50,20,10"  # Query-time transformations.
  config.attacks.blur_sigmas = "0.5,0.7,1.0"
  config.attacks.resize_factors = "0.875,0.75,0.5"
  # Attacks on the distilled data itself (data_threats.py), before any model:
  # cleansing, robust training and detection, on the distilled set vs the clean
  # distilled set; attacks.json's "data" section. The networks trained on what
  # the pirate keeps use the evaluation's recipe (eval.*, the set's learned lr).
  config.attacks.data_threats = True
  # Outlier scores of each image, from the pirate's own clean model (trained for
  # data_clean_model_epochs on its held-out data, eval.real_* recipe: its features,
  # or for "disagreement" its disbelief in the image's label) or, for "corner",
  # its top-left patch against the set's typical corner (no key).
  config.attacks.data_cleansers = "spectral,clustering,corner,disagreement"
  config.attacks.data_drop_fractions = "0.1,0.3"  # Each cleanser drops its top k% ...
  config.attacks.data_clean_model_epochs = 100
  config.attacks.data_cluster_dims = 10  # Activation clustering: PCA dimensions (<= class - 1).
  config.attacks.data_label_smoothing = "0.1,0.3"  # Robust training: label smoothing ...
  # ... and strong augmentation on every batch (on top of DSA): cutout of a patch-sized
  # square that lands on the trigger corner with each listed probability, a random
  # crop (shift up to data_crop_ratio of the side) and a flip. "" skips either.
  config.attacks.data_strong_augment = "0.5"
  config.attacks.data_crop_ratio = 0.125
  # Neural Cleanse on every evaluated network of both sets: Adam steps and lr,
  # clean attacker images, the mask-L1 weight and the success rate a mask must reach.
  config.attacks.data_nc_steps = 100
  config.attacks.data_nc_images = 64
  config.attacks.data_nc_lr = 0.3
  config.attacks.data_nc_lambda = 0.01
  config.attacks.data_nc_success = 0.9
  return config


def section(which: str, /, **overrides) -> ml_collections.ConfigDict:
  """One section of `base_config()` ("distill", "dsa", ...) with some fields overridden.

  Library callers and tests start from the real schema this way, so that a
  new field cannot silently skip them.
  """
  config = base_config()[which]
  config.update(overrides)
  return config


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that would otherwise fail late (after hours of expert training).

  Raises a one-line CCDDError naming the field. Each check sits here, beside
  `base_config`, which defines the fields; model names and norms are the
  model registry's (`models.parse_arch`).
  """
  # Imported here: models imports jax and flax, and configs import this module.
  from ccdd_jax import inner_loop  # pylint: disable=g-import-not-at-top
  from ccdd_jax import models  # pylint: disable=g-import-not-at-top

  def require(ok: bool, message: str):
    if not ok:
      raise CCDDError(f"invalid config: {message}")

  d, e, w, v = config.distill, config.experts, config.watermark, config.eval
  require(d.ipc >= 1, f"distill.ipc = {d.ipc} must be >= 1")
  require(d.iterations >= 1, f"distill.iterations = {d.iterations} must be >= 1")
  require(d.syn_steps >= 1, f"distill.syn_steps = {d.syn_steps} must be >= 1")
  require(
    d.max_start_epoch + d.expert_epochs <= e.epochs,
    f"distill.max_start_epoch + distill.expert_epochs = "
    f"{d.max_start_epoch + d.expert_epochs} exceeds experts.epochs = {e.epochs}",
  )
  require(e.num_experts >= 1 and e.epochs >= 1, "experts.num_experts and epochs must be >= 1")
  require(e.group_size >= 0, f"experts.group_size = {e.group_size} must be >= 0 (0 = all)")
  require(config.concurrency >= 0, f"concurrency = {config.concurrency} must be >= 0 (0 = auto)")
  require(config.num_devices >= 0, f"num_devices = {config.num_devices} must be >= 0 (0 = all)")
  require(w.n_patterns >= 1, f"watermark.n_patterns = {w.n_patterns} must be >= 1")
  require(0.0 < w.ratio < 1.0, f"watermark.ratio = {w.ratio} (|D_W| / |D_C|) must be in (0, 1)")
  require(
    not (config.data.name == "digits" and config.data.image_size not in (0, 8)),
    f"data.image_size = {config.data.image_size}: digits are only 8x8 (use 0)",
  )
  require(w.patch_size >= 0, f"watermark.patch_size = {w.patch_size} must be >= 0 (0 = half)")
  require(
    not (config.data.image_size and w.patch_size > config.data.image_size),
    f"watermark.patch_size = {w.patch_size} exceeds data.image_size = {config.data.image_size}",
  )
  require(d.checkpoint_every >= 0, f"distill.checkpoint_every = {d.checkpoint_every} must be >= 0")
  require(0.0 < w.alpha < 1.0, f"watermark.alpha = {w.alpha} must be in (0, 1)")
  require(v.num_seeds >= 1 and v.epochs >= 1, "eval.num_seeds and eval.epochs must be >= 1")
  require(
    min(d.beta, e.lambda1, e.lambda2, e.lambda3) >= 0.0,
    "distill.beta and experts.lambda1..3 must be >= 0",
  )
  require(
    d.eq10_form in EQ10_FORMS,
    f"distill.eq10_form = {d.eq10_form!r}: use one of {', '.join(EQ10_FORMS)}",
  )
  require(
    0.0 <= d.clean_expert_fraction <= 1.0,
    f"distill.clean_expert_fraction = {d.clean_expert_fraction} must be in [0, 1]",
  )
  require(
    not d.split_roles
    or (0.0 < d.clean_expert_fraction < 1.0 and d.carriers_per_pattern + d.triggers_per_pattern),
    "distill.split_roles needs a pool of both kinds (0 < distill.clean_expert_fraction < 1) "
    "and trigger slots (distill.carriers_per_pattern or triggers_per_pattern > 0)",
  )
  require(
    min(d.carriers_per_pattern, d.triggers_per_pattern, e.fp_normal_last_epochs) >= 0,
    "distill.carriers_per_pattern, triggers_per_pattern, experts.fp_normal_last_epochs: >= 0",
  )
  require(
    e.fp_normal_last_epochs <= e.epochs,
    f"experts.fp_normal_last_epochs = {e.fp_normal_last_epochs} exceeds experts.epochs",
  )
  require(
    d.carrier_source in ("train", "set"),
    f"distill.carrier_source = {d.carrier_source!r}: use train or set",
  )
  require(
    d.watermark_embedding in WATERMARK_EMBEDDINGS,
    f"distill.watermark_embedding = {d.watermark_embedding!r}: use one of "
    f"{', '.join(WATERMARK_EMBEDDINGS)}",
  )
  require(
    d.watermark_embedding != "appended"
    or (d.carriers_per_pattern >= 1 and not d.triggers_per_pattern and not d.soft_labels),
    "distill.watermark_embedding = 'appended' needs distill.carriers_per_pattern >= 1 (the "
    "carriers are the watermark), distill.triggers_per_pattern = 0 (the clean set has no "
    "seeded slots) and hard labels (distill.soft_labels = '')",
  )
  require(min(d.gamma_wm, d.gamma_clean) >= 0.0, "distill.gamma_wm and gamma_clean must be >= 0")
  require(
    d.soft_labels in SOFT_LABELS,
    f"distill.soft_labels = {d.soft_labels!r}: use one of {', '.join(map(repr, SOFT_LABELS))}",
  )
  require(
    min(d.lr_label, d.label_logit_scale) > 0.0,
    "distill.lr_label and distill.label_logit_scale must be > 0",
  )
  require(d.objective_batch >= 1, f"distill.objective_batch = {d.objective_batch} must be >= 1")
  require(
    0.0 <= config.data.attacker_fraction < 1.0,
    f"data.attacker_fraction = {config.data.attacker_fraction} must be in [0, 1)",
  )
  require(config.data.zca_eps > 0.0, f"data.zca_eps = {config.data.zca_eps} must be > 0")
  require(
    d.remat in inner_loop.REMAT_POLICIES,
    f"distill.remat = {d.remat!r}: use one of {', '.join(inner_loop.REMAT_POLICIES)}",
  )
  try:
    inner_loop.resolve_unroll(d.unroll, d.syn_steps)
  except ValueError as err:
    raise CCDDError(f"invalid config: distill.unroll = {d.unroll!r}: {err}") from err
  _validate_attacks(config.attacks, v.num_seeds, require)
  try:
    models.resolve_conv_impl(config.model.conv_impl)
    models.parse_arch(config.model.name)
    models.eval_architectures(v.models, config.model.name)
  except CCDDError as err:
    raise CCDDError(f"invalid config: {err}") from err


def _validate_attacks(a: ml_collections.ConfigDict, eval_seeds: int, require) -> None:
  """The checks of the `attacks` section (threats.ATTACKS names each strength list's rule)."""
  from ccdd_jax import reporting  # pylint: disable=g-import-not-at-top
  from ccdd_jax import threats  # pylint: disable=g-import-not-at-top

  sets = threats.parse_list(a.sets)
  require(
    sets and set(sets) <= set(reporting.SETS) and len(set(sets)) == len(sets),
    f"attacks.sets = {a.sets!r}: list some of {', '.join(reporting.SETS)}, each once",
  )
  require(
    0 <= a.num_seeds <= eval_seeds,
    f"attacks.num_seeds = {a.num_seeds} must be in [0, eval.num_seeds = {eval_seeds}]",
  )
  require(a.lr > 0 and a.extraction_lr > 0, "attacks.lr and attacks.extraction_lr must be > 0")
  require(0.0 <= a.momentum < 1.0, f"attacks.momentum = {a.momentum} must be in [0, 1)")
  require(a.weight_decay >= 0.0, f"attacks.weight_decay = {a.weight_decay} must be >= 0")
  require(a.batch_size >= 1, f"attacks.batch_size = {a.batch_size} must be >= 1")
  require(
    a.fine_prune_epochs >= 1, f"attacks.fine_prune_epochs = {a.fine_prune_epochs} must be >= 1"
  )
  require(
    0.0 < a.overwrite_ratio <= 1.0,
    f"attacks.overwrite_ratio = {a.overwrite_ratio} must be in (0, 1]",
  )
  for spec in threats.ATTACKS.values():
    try:
      values = threats.parse_list(a[spec.field], spec.kind)
    except (TypeError, ValueError):
      values = None
    require(
      values is not None and all(spec.valid(x) for x in values),
      f"attacks.{spec.field} = {a[spec.field]!r}: use comma-separated {spec.rule}",
    )
  _validate_data_threats(a, require)


def _validate_data_threats(a: ml_collections.ConfigDict, require) -> None:
  """The checks of the `attacks.data_*` fields (data_threats.py)."""
  from ccdd_jax import data_threats  # pylint: disable=g-import-not-at-top
  from ccdd_jax import threats  # pylint: disable=g-import-not-at-top

  require(isinstance(a.data_threats, bool), "attacks.data_threats must be True or False")
  cleansers = threats.parse_list(a.data_cleansers)
  require(
    set(cleansers) <= set(data_threats.CLEANSERS) and len(set(cleansers)) == len(cleansers),
    f"attacks.data_cleansers = {a.data_cleansers!r}: list some of "
    f"{', '.join(data_threats.CLEANSERS)}, each once",
  )
  lists = (
    ("data_drop_fractions", lambda v: 0.0 < v < 1.0, "numbers in (0, 1)"),
    ("data_label_smoothing", lambda v: 0.0 < v < 1.0, "numbers in (0, 1)"),
    ("data_strong_augment", lambda v: 0.0 <= v <= 1.0, "probabilities in [0, 1]"),
  )
  for field, valid, rule in lists:
    try:
      values = threats.parse_list(a[field], float)
    except (TypeError, ValueError):
      values = None
    require(
      values is not None and all(valid(x) for x in values),
      f"attacks.{field} = {a[field]!r}: use comma-separated {rule}",
    )
  for field in ("data_clean_model_epochs", "data_cluster_dims", "data_nc_steps", "data_nc_images"):
    require(a[field] >= 1, f"attacks.{field} = {a[field]} must be >= 1")
  require(
    0.0 <= a.data_crop_ratio <= 0.5, f"attacks.data_crop_ratio = {a.data_crop_ratio}: [0, 0.5]"
  )
  require(
    a.data_nc_lr > 0 and a.data_nc_lambda > 0, "attacks.data_nc_lr and data_nc_lambda must be > 0"
  )
  require(0.0 < a.data_nc_success <= 1.0, f"attacks.data_nc_success = {a.data_nc_success}: (0, 1]")


def paper_config(dataset: str, ipc: int) -> ml_collections.ConfigDict:
  """The full config of one cell of the paper's Table 1."""
  if (dataset, ipc) not in MTT_SETTINGS:
    raise ValueError(f"no paper setting for {dataset} IPC {ipc}")
  syn_steps, expert_epochs, max_start, lr_img, lr_lr, lr_teacher, batch_syn = MTT_SETTINGS[
    (dataset, ipc)
  ]
  data_name, n_patterns, depth = DATASETS[dataset]
  config = base_config()
  config.data.name = data_name  # Or "folder" with data.root = an image-folder tree / .tar.gz.
  config.model.depth = depth
  config.data.zca = False  # The CCDD paper; MTT_ZCA[(dataset, ipc)] is MTT's choice.
  config.watermark.n_patterns = n_patterns
  d = config.distill
  d.ipc = ipc
  d.syn_steps, d.expert_epochs, d.max_start_epoch = syn_steps, expert_epochs, max_start
  d.lr_img, d.lr_lr, d.lr_teacher, d.batch_syn = lr_img, lr_lr, lr_teacher, batch_syn
  return config
