"""Config validation: one-line errors for values that would otherwise fail late.

Each check names its field. Lists of names (forms of eq. 10, embeddings,
models, attacks, cleansers, remat policies, trajectory stores) are read from
the registries of the modules that implement them; those modules never import
the config.
"""

import ml_collections

from ccdd_jax import CCDDError
from ccdd_jax import lists
from ccdd_jax.method import augment
from ccdd_jax.method import distill
from ccdd_jax.method import embedding
from ccdd_jax.method import evaluate
from ccdd_jax.method import inner_loop
from ccdd_jax.method import models
from ccdd_jax.method import trajectory_pairs
from ccdd_jax.method import verify
from ccdd_jax.threats import data_attacks
from ccdd_jax.threats import suite


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that would otherwise fail late (after hours of expert training).

  Raises a one-line CCDDError naming the field (schema.base_config defines
  the fields); model names and norms are the model registry's
  (`models.parse_arch`).
  """
  _validate_sizes(config)
  _validate_levers(config.distill, config.experts)
  _validate_crafting(config.distill, config.watermark, bool(config.data.zca))
  d, v = config.distill, config.eval
  require(
    0.0 <= config.data.attacker_fraction < 1.0,
    f"data.attacker_fraction = {config.data.attacker_fraction} must be in [0, 1)",
  )
  require(config.data.zca_eps > 0.0, f"data.zca_eps = {config.data.zca_eps} must be > 0")
  require(
    d.remat in inner_loop.REMAT_POLICIES,
    f"distill.remat = {d.remat!r}: use one of {', '.join(inner_loop.REMAT_POLICIES)}",
  )
  pairs, stores = d.pairs_per_iteration, trajectory_pairs.TRAJECTORY_STORES
  require(pairs >= 1, f"distill.pairs_per_iteration = {pairs} must be >= 1")
  require(
    d.trajectory_store in stores,
    f"distill.trajectory_store = {d.trajectory_store!r}: use one of {', '.join(stores)}",
  )
  try:
    inner_loop.resolve_unroll(d.unroll, d.syn_steps)
  except ValueError as err:
    raise CCDDError(f"invalid config: distill.unroll = {d.unroll!r}: {err}") from err
  _validate_attacks(config.attacks, v.num_seeds)
  try:
    models.resolve_conv_impl(config.model.conv_impl)
    models.parse_arch(config.model.name)
    models.eval_architectures(v.models, config.model.name)
  except CCDDError as err:
    raise CCDDError(f"invalid config: {err}") from err


def require(ok: bool, message: str) -> None:
  """Raises the one-line CCDDError `invalid config: <message>` unless `ok`."""
  if not ok:
    raise CCDDError(f"invalid config: {message}")


def _validate_sizes(config: ml_collections.ConfigDict) -> None:
  """Counts, sizes and probabilities of every section."""
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
  require(
    e.tensorboard_every >= 0, f"experts.tensorboard_every = {e.tensorboard_every} must be >= 0"
  )
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
  images = d.tensorboard_images_every
  require(images >= 0, f"distill.tensorboard_images_every = {images} must be >= 0")
  require(0.0 < w.alpha < 1.0, f"watermark.alpha = {w.alpha} must be in (0, 1)")
  require(v.num_seeds >= 1 and v.epochs >= 1, "eval.num_seeds and eval.epochs must be >= 1")


def _validate_levers(d: ml_collections.ConfigDict, e: ml_collections.ConfigDict) -> None:
  """The distillation's levers and the embedding (method/distill.py, method/embedding.py)."""
  require(
    min(d.beta, e.lambda1, e.lambda2, e.lambda3) >= 0.0,
    "distill.beta and experts.lambda1..3 must be >= 0",
  )
  require(
    d.eq10_form in distill.EQ10_FORMS,
    f"distill.eq10_form = {d.eq10_form!r}: use one of {', '.join(distill.EQ10_FORMS)}",
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
    d.watermark_embedding in embedding.WATERMARK_EMBEDDINGS,
    f"distill.watermark_embedding = {d.watermark_embedding!r}: use one of "
    f"{', '.join(embedding.WATERMARK_EMBEDDINGS)}",
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
    d.soft_labels in embedding.SOFT_LABELS,
    f"distill.soft_labels = {d.soft_labels!r}: use one of "
    f"{', '.join(map(repr, embedding.SOFT_LABELS))}",
  )
  require(
    min(d.lr_label, d.label_logit_scale) > 0.0,
    "distill.lr_label and distill.label_logit_scale must be > 0",
  )
  require(d.objective_batch >= 1, f"distill.objective_batch = {d.objective_batch} must be >= 1")


def _validate_crafting(d, w, zca: bool) -> None:
  """The query protocol and the "clean_label" embedding's crafting (method/crafting.py)."""
  require(
    w.queries in verify.QUERY_PROTOCOLS,
    f"watermark.queries = {w.queries!r}: use one of {', '.join(verify.QUERY_PROTOCOLS)}",
  )
  require(0.0 <= w.query_noise <= 1.0, f"watermark.query_noise = {w.query_noise}: use [0, 1]")
  if d.watermark_embedding != "clean_label":
    return
  require(
    w.queries == "key_derived",
    "distill.watermark_embedding = 'clean_label' is crafted for key-derived queries: set "
    "watermark.queries=key_derived (stamped queries are not taught within a pixel budget)",
  )
  require(not zca, "distill.watermark_embedding = 'clean_label' bounds pixels: set data.zca=False")
  require(not d.soft_labels, "distill.watermark_embedding = 'clean_label' keeps hard labels")
  require(0.0 < d.craft_eps <= 1.0, f"distill.craft_eps = {d.craft_eps}: use (0, 1]")
  require(
    min(d.craft_iterations, d.craft_queries, d.craft_clean_batch) >= 1 and d.craft_epochs >= 0,
    "distill.craft_iterations, craft_queries, craft_clean_batch must be >= 1, craft_epochs >= 0",
  )
  require(
    d.craft_lr > 0.0 and d.craft_clean_weight >= 0.0,
    "distill.craft_lr must be > 0 and craft_clean_weight >= 0",
  )
  models.eval_architectures(d.craft_models, "convnet", "distill.craft_models")
  augment.strategy_list(d.craft_augmentations, "none", "distill.craft_augmentations")


def _validate_attacks(a: ml_collections.ConfigDict, eval_seeds: int) -> None:
  """The checks of the `attacks` section (threats.ATTACKS names each strength list's rule)."""

  sets = lists.parse_list(a.sets)
  require(
    sets and set(sets) <= set(evaluate.SETS) and len(set(sets)) == len(sets),
    f"attacks.sets = {a.sets!r}: list some of {', '.join(evaluate.SETS)}, each once",
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
  for spec in suite.ATTACKS.values():
    try:
      values = lists.parse_list(a[spec.field], spec.kind)
    except (TypeError, ValueError):
      values = None
    require(
      values is not None and all(spec.valid(x) for x in values),
      f"attacks.{spec.field} = {a[spec.field]!r}: use comma-separated {spec.rule}",
    )
  _validate_data_threats(a)


def _validate_data_threats(a: ml_collections.ConfigDict) -> None:
  """The checks of the `attacks.data_*` fields (data_threats.py)."""

  require(isinstance(a.data_threats, bool), "attacks.data_threats must be True or False")
  cleansers = lists.parse_list(a.data_cleansers)
  require(
    set(cleansers) <= set(data_attacks.CLEANSERS) and len(set(cleansers)) == len(cleansers),
    f"attacks.data_cleansers = {a.data_cleansers!r}: list some of "
    f"{', '.join(data_attacks.CLEANSERS)}, each once",
  )
  fraction_lists = (
    ("data_drop_fractions", lambda v: 0.0 < v < 1.0, "numbers in (0, 1)"),
    ("data_label_smoothing", lambda v: 0.0 < v < 1.0, "numbers in (0, 1)"),
    ("data_strong_augment", lambda v: 0.0 <= v <= 1.0, "probabilities in [0, 1]"),
  )
  for field, valid, rule in fraction_lists:
    try:
      values = lists.parse_list(a[field], float)
    except (TypeError, ValueError):
      values = None
    require(
      values is not None and all(valid(x) for x in values),
      f"attacks.{field} = {a[field]!r}: use comma-separated {rule}",
    )
  require(isinstance(a.data_drop_flagged, bool), "attacks.data_drop_flagged must be True or False")
  ensemble = lists.parse_list(a.data_ensemble_models)
  try:
    known = all(models.parse_arch(arch) for arch in ensemble)
  except CCDDError:
    known = False
  require(
    ensemble and known and len(set(ensemble)) == len(ensemble),
    f"attacks.data_ensemble_models = {a.data_ensemble_models!r}: list some of "
    f"{', '.join(models.ARCHITECTURES)} (optionally :<norm>), each once",
  )
  for field in (
    "data_clean_model_epochs",
    "data_cluster_dims",
    "data_nc_steps",
    "data_nc_images",
    "data_ensemble_seeds",
  ):
    require(a[field] >= 1, f"attacks.{field} = {a[field]} must be >= 1")
  require(
    a.data_self_consistency_folds >= 2,
    f"attacks.data_self_consistency_folds = {a.data_self_consistency_folds} must be >= 2",
  )
  require(
    a.data_self_consistency_epochs >= 0,
    f"attacks.data_self_consistency_epochs = {a.data_self_consistency_epochs} must be >= 0 "
    "(0 = eval.epochs)",
  )
  require(
    0.0 <= a.data_crop_ratio <= 0.5, f"attacks.data_crop_ratio = {a.data_crop_ratio}: [0, 0.5]"
  )
  require(
    a.data_nc_lr > 0 and a.data_nc_lambda > 0, "attacks.data_nc_lr and data_nc_lambda must be > 0"
  )
  require(0.0 < a.data_nc_success <= 1.0, f"attacks.data_nc_success = {a.data_nc_success}: (0, 1]")
