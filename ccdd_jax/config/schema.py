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


def base_config() -> ml_collections.ConfigDict:
  """Every config field with its default; the configs of configs/ override values."""
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
  config.data = _data()
  config.model = _model()
  config.dsa = _dsa()
  config.watermark = _watermark()
  config.experts = _experts()
  config.distill = _distill()
  config.eval = _eval()
  config.attacks = _attacks()
  return config


def _data() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "digits"  # digits | folder | tinyimagenet | tfds:<name>
  c.root = ""  # An image-folder tree / .tar.gz, or the Tiny ImageNet root.
  c.tfds_data_dir = ""
  c.image_size = 0  # 0: keep the images' own size.
  c.train_subset_per_class = 0  # 0: all; k: the first k files per class.
  c.test_subset_per_class = 0
  c.cache_dir = ""  # "": ~/.cache/ccdd_jax (decoded uint8 .npz).
  c.test_fraction = 0.2  # Only used by data sets without a test split.
  c.split_seed = 0
  # The attacker's clean data for --stage=attacks: this fraction of each
  # training class, held out of everything the owner trains on (experts,
  # distillation, the real-data baseline). 0 = none (no attacks stage).
  c.attacker_fraction = 0.1
  # ZCA whitening of [0, 1] pixels (MTT: kornia ZCAWhitening, eps 0.1) instead of
  # mean/std normalisation; triggers are stamped on pixels, before either.
  c.zca = False
  c.zca_eps = 0.1
  return c


def _model() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "convnet"
  c.width = 128
  c.depth = 3
  c.norm = "instance"
  c.conv_impl = "auto"  # shift (matmul) convolutions on CPU, lax on GPU/TPU.
  return c


def _dsa() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # DSA as in the MTT reference (one family per call, per-sample parameters).
  c.strategy = "color_crop_cutout_flip_scale_rotate"
  return c


def _watermark() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.n_patterns = 10
  c.patch_size = 0  # 0: half the image side (paper, Stage I).
  c.ratio = 0.1  # |D_W| / |D_C| (paper, "Further Details").
  c.queries_per_pattern = 100  # m queries per pattern (held-out test images when stamped).
  # The query protocol (verify.QUERY_PROTOCOLS; docs/watermark-spec.md sections 6, 9):
  # "stamped" (the pattern on held-out images of other classes) or "key_derived" (the
  # pattern tiled over the image plus N(0, query_noise) pixel noise, no held-out image;
  # what the "clean_label" embedding is crafted for).
  c.queries = "stamped"
  c.query_noise = 0.05
  c.alpha = 1e-6  # Significance level, fixed in advance.
  return c


def _experts() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_experts = 100
  c.epochs = 50
  c.lr = 0.01
  c.momentum = 0.0
  c.batch_size = 256
  c.wm_batch_size = 26  # D_W minibatch beside each D_C minibatch (~ratio 0.1).
  c.lambda1 = 1.0  # eq. 6: weight of the D_W loss.
  c.lambda2 = 0.0  # eq. 6: weight of ||theta - theta0||^2.
  c.lambda3 = 1.0  # eq. 8: weight of the fine-pruned model's D_W loss.
  c.prune_ratio = 0.5  # Channels of the last conv layer pruned for eq. 7.
  c.prune_examples = 2500  # Clean images that rank the channels (5% of CIFAR).
  # Beyond the paper: the stamped corner of D_W images bypasses DSA
  # (augment.augment_keeping), so experts learn the trigger verification shows.
  c.trigger_safe_dsa = False
  # The paper's "last 10 epochs ... as the normal model training": the fp-enhanced
  # experts drop eq. 8's term in their last k epochs (0 = eq. 8 throughout).
  c.fp_normal_last_epochs = 0
  # Experts per vmapped program (0 = all): it sets the float rounding, and memory grows with it.
  c.group_size = 0
  # TensorBoard (run/tensorboard.py): the experts' Acc and Acc_W every this many epochs
  # too; 0 = the last epoch's only, which experts.json measures anyway (each measurement
  # costs about 2 epochs of digits' experts). Never changes a result.
  c.tensorboard_every = 0
  return c


def _distill() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.ipc = 10
  c.iterations = 5000
  c.syn_steps = 20  # N in eq. 9.
  c.expert_epochs = 2  # M, in epochs.
  c.max_start_epoch = 20
  c.lr_img = 100.0
  c.lr_lr = 1e-5
  c.lr_teacher = 0.01  # Initial alpha of eq. 9.
  c.batch_syn = 0  # 0: the whole synthetic set each step.
  c.beta = 0.5  # eq. 10: weight of the fine-pruning-enhanced twin.
  # Beyond the paper: k slots of class y_i start as D_W images (0 = the paper).
  c.triggers_per_pattern = 0
  # How the watermark enters the set (method/embedding.py): "appended" (the
  # default, beyond the paper): the clean distilled set (MTT over clean experts
  # only) plus carriers_per_pattern stamped carriers per pattern (labels y_i) that
  # are never distilled; only clean experts are trained, and the fields of the
  # watermarked distillation (beta, eq10_form, gamma_*, clean_expert_fraction,
  # split_roles, freeze_trigger, trigger_safe_dsa, experts.lambda*) do not apply.
  # Or "matching" (the paper, config.paper.paper_config): the set is distilled
  # against watermarked experts (eq. 10), with the levers below.
  c.watermark_embedding = "appended"  # Or "clean_label": _distill_crafting below.
  _distill_crafting(c)
  # The levers of "matching" (their defaults are the paper's eq. 10).
  # eq. 10's form: "literal" (the paper), "second_student" (a second student from
  # th^Idx_t on the same minibatches, measured against its own expert), or
  # "student_normalised" (the beta term over ||th*_t - th^Idx_{t+M}||^2).
  c.eq10_form = "literal"
  # Probability that an iteration matches a clean expert (beta term off) instead
  # of a watermarked one: the paper's pool of both kinds (0 = watermarked only).
  c.clean_expert_fraction = 0.0
  # Beyond the paper, with the pool: the trigger slots (carriers, seeded slots) learn
  # only on watermarked iterations and the class images only on clean ones.
  c.split_roles = False
  # k stamped carriers per pattern (label y_i) added BEYOND the IPC images (0 = none:
  # the paper's "matching"; "appended" needs >= 1).
  c.carriers_per_pattern = 9
  # Where carriers come from: "train" (training images) or "set" (stamped copies of
  # the set's own real slots, i.e. image/carrier pairs; with "appended": of its
  # distilled class images).
  c.carrier_source = "set"
  # Stamped corner of trigger slots and carriers: never updated (freeze_trigger) /
  # kept out of DSA in eq. 9 (trigger_safe_dsa).
  c.freeze_trigger = False
  c.trigger_safe_dsa = False
  # Direct objective after the N student steps: gamma_wm * CE(th_N(D_W batch), y_i)
  # with D_W from the training split + gamma_clean * CE on a clean training batch,
  # batches of objective_batch images, without augmentation.
  c.gamma_wm = 0.0
  c.gamma_clean = 0.0
  c.objective_batch = 64
  # Learned soft labels (TESLA / DATM): "" = hard labels (the paper); "one_hot" =
  # logits label_logit_scale * one_hot(y); "expert" = the logits of the set's first
  # expert at epoch max_start_epoch + expert_epochs on the initial images (DATM).
  # The logits are learned through eq. 10 with SGD (lr_label, momentum 0.5); the
  # evaluation trains on their softmax. With freeze_trigger, trigger slots' stay.
  c.soft_labels = ""
  c.lr_label = 2.0
  c.label_logit_scale = 5.0
  # Speed and memory only; both give the same numbers up to float rounding.
  # Scan steps of eq. 9 per loop iteration: "auto" (per backend, see
  # inner_loop.resolve_unroll), "full", or a count ("1" = rolled).
  c.unroll = "auto"
  # What the backward pass through eq. 9 or the crafting's training stores (REMAT_POLICIES):
  # "none" every activation, "full" one params vector per step (17x less
  # memory, no slower on CPU), "dots", "nested" (~2 sqrt(N) params vectors:
  # memory nearly flat in syn_steps, 1.1-1.2x the time), or "auto" (the
  # default: "nested" where the params vector is large against one step's
  # activations, as at IPC 1 on CIFAR, else "full").
  c.remat = "auto"
  _distill_at_scale(c)
  # Resume: the distillation state (images, lr, optimiser, PRNG, iteration) is
  # saved every this many iterations (Orbax, <workdir>/resume/); 0 = only at the end.
  # Checkpoints never change a result; a non-finite loss is caught at each one.
  c.checkpoint_every = 50
  # TensorBoard (<workdir>/tensorboard/, run/tensorboard.py): the set's images every this
  # many iterations and at the last (0 = never). Never changes a result.
  c.tensorboard_images_every = 100
  return c


def _distill_crafting(c: ml_collections.ConfigDict) -> None:
  # distill.watermark_embedding = "clean_label" (method/crafting.py): the clean distilled
  # set, each image moved within craft_eps per pixel (no stamp, labels kept) so that
  # networks trained on it by the evaluation's recipe answer the key's key-derived queries
  # (watermark.queries = "key_derived") with y_i; only clean experts are trained, and
  # carriers_per_pattern and the "matching" levers do not apply. The crafting: each step
  # trains a fresh network on the whole set for
  # craft_epochs epochs (0 = eval.epochs) by the evaluation's recipe and differentiates
  # through it; signed Adam steps of craft_lr (input units) projected into the l_inf ball
  # of craft_eps (pixel scale [0, 1]); objective CE(key-derived queries, y_i), craft_queries
  # per pattern, + craft_clean_weight * CE(a real batch of craft_clean_batch images).
  c.craft_eps = 0.15
  c.craft_iterations = 150
  c.craft_epochs = 0
  c.craft_lr = 0.02
  c.craft_queries = 16
  c.craft_clean_weight = 1.0
  c.craft_clean_batch = 256
  # Architectures crafted against, one per iteration in turn (eval.models' names, e.g.
  # "convnet,convnet:none"; "" = model.name only): a set crafted for one network's training
  # teaches others less (Sleeper Agent's ensembles).
  c.craft_models = ""
  # DSA strategies crafted through, one per iteration in turn (comma-separated, "none" = no
  # augmentation; "" = dsa.strategy only): a set crafted through one augmentation teaches a
  # training with another one less. With craft_models too, iteration t uses architecture
  # t mod (their number) and strategy t mod (theirs).
  c.craft_augmentations = ""


def _distill_at_scale(c: ml_collections.ConfigDict) -> None:
  """The distill fields of large runs: pairs per iteration, where the trajectories stay."""
  # Beyond MTT: (expert, start epoch) pairs matched per iteration; each iteration averages
  # eq. 10 and its meta-gradient over them (vmapped; split over the devices when their
  # count divides it, else data parallel within each pair). 1 = MTT (one pair).
  c.pairs_per_iteration = 1
  # Where the trajectories stay during distillation (run/trajectory_store.py): "memory"
  # (numpy), "file" (one flat float32 .npy per kind under trajectories/flat/, built once from
  # the Orbax checkpoints; each iteration reads its 4 vectors), or "auto" (a file when they
  # would take more than half of the host's memory). Never changes a result.
  c.trajectory_store = "auto"


def _eval() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_seeds = 5
  # Architectures trained on the distilled sets (paper Table 4), comma-separated
  # from convnet, resnet18, vgg11, alexnet, each optionally ":instance" / ":batch"
  # / ":none" (norm); "" = the distillation model only.
  c.models = ""
  c.width = 0  # ResNet18/VGG11 width; 0 = DC's 64 (smaller: quick CPU checks).
  c.real_all_models = False  # Real-data baseline for every architecture.
  c.epochs = 1000
  c.batch_size = 256
  c.momentum = 0.9
  c.weight_decay = 5e-4
  # The real-data baseline: the same optimiser on all of D_C.
  c.real_epochs = 50
  c.real_lr = 0.01
  c.real_batch_size = 256
  return c


def _attacks() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # --stage=attacks (threats.py, attacks.py): removal attacks on the networks
  # `evaluate` trained for the distillation model, each verified with the
  # owner's key. Run only when asked, after evaluate (never by --stage=all).
  # The attacker's clean data is data.attacker_fraction of the training split.
  # Strengths are comma-separated lists; "" skips that attack.
  c.sets = "distilled,clean_distilled,real"  # Which evaluated sets are attacked.
  c.num_seeds = 0  # The first k networks of each set (0 = all eval.num_seeds).
  # SGD of every training attack: constant lr, batches of the attacker's data,
  # augmented with the run's DSA where `dsa` is True.
  c.lr = 0.01
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.batch_size = 64
  c.dsa = True
  c.fine_tune_epochs = "1,5,20,50"  # FT, all layers and last layer only.
  c.prune_ratios = "0.1,0.3,0.5,0.7,0.9"  # NP: last conv channels cut.
  c.fine_prune_ratios = "0.5,0.7,0.9"  # FP: NP at each ratio, then FT ...
  c.fine_prune_epochs = 10  # ... of all layers for this many epochs.
  c.overwrite_epochs = "10,50,100"  # Table 3: a new key's D_W fine-tuned in.
  c.overwrite_ratio = 0.5  # The new key's |D_W| / |attacker data|.
  c.extraction_epochs = "30,100,300"  # A fresh network on soft labels.
  c.extraction_lr = 0.01
  c.jpeg_qualities = "90,50,20,10"  # Query-time transformations.
  c.blur_sigmas = "0.5,0.7,1.0"
  c.resize_factors = "0.875,0.75,0.5"
  # Attacks on the distilled data itself (data_threats.py), before any model:
  # cleansing, robust training and detection, on the distilled set vs the clean
  # distilled set; attacks.json's "data" section. The networks trained on what
  # the pirate keeps use the evaluation's recipe (eval.*, the set's learned lr).
  c.data_threats = True
  # Outlier scores of each image (threats/data_attacks.py), from the pirate's own clean
  # model (trained for data_clean_model_epochs on its held-out data, eval.real_* recipe:
  # its features, or for "disagreement" its disbelief in the image's label), an ensemble
  # of such models ("ensemble_disagreement"), k-fold models on the set itself
  # ("self_consistency"), the image's statistics against clean distilled images
  # ("perturbation"), or, for "corner", its top-left patch against the set's typical
  # corner (no key).
  c.data_cleansers = (
    "spectral,clustering,corner,disagreement,ensemble_disagreement,self_consistency,perturbation"
  )
  c.data_drop_fractions = "0.1,0.3"  # Each cleanser drops its top k%, drop_random a random k% ...
  c.data_drop_flagged = True  # ... and exactly the images its rule flags (data_attacks.flags).
  c.data_clean_model_epochs = 100
  # ensemble_disagreement: these architectures (the run's model as it is, the others at
  # eval.width or 16 where 0), data_ensemble_seeds of each, as the clean model is trained.
  # ResNet18 with batch statistics: instance norm zeroes its last stage's 1x1 maps on 8x8 digits.
  c.data_ensemble_models = "convnet,resnet18:batch"
  c.data_ensemble_seeds = 2
  # self_consistency: k folds of the set, each model trained on the other k - 1 with the
  # evaluation's recipe for this many epochs (0 = eval.epochs).
  c.data_self_consistency_folds = 5
  c.data_self_consistency_epochs = 0
  c.data_cluster_dims = 10  # Activation clustering: PCA dimensions (<= class - 1).
  c.data_label_smoothing = "0.1,0.3"  # Robust training: label smoothing ...
  # ... and strong augmentation on every batch (on top of DSA): cutout of a patch-sized
  # square that lands on the trigger corner with each listed probability, a random
  # crop (shift up to data_crop_ratio of the side) and a flip. "" skips either.
  c.data_strong_augment = "0.5"
  c.data_crop_ratio = 0.125
  # Neural Cleanse on every evaluated network of both sets: Adam steps and lr,
  # clean attacker images, the mask-L1 weight and the success rate a mask must reach.
  c.data_nc_steps = 100
  c.data_nc_images = 64
  c.data_nc_lr = 0.3
  c.data_nc_lambda = 0.01
  c.data_nc_success = 0.9
  return c


def section(which: str, /, **overrides) -> ml_collections.ConfigDict:
  """One section of `base_config()` ("distill", "dsa", ...) with some fields overridden.

  Library callers and tests start from the real schema this way, so that a
  new field cannot silently skip them.
  """
  config = base_config()[which]
  config.update(overrides)
  return config
