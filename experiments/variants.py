"""The ablation's variants: the lever sets, the variants built from them, and their configs.

  python -m experiments.ablation --list          # every variant, its length and its fields

A setting (`SETTINGS`) names a paper-literal config and a default config. Every
variant but "default" is the paper-literal config plus the fields it lists;
"default" is the setting's default config itself. A field variant runs its
embedding's base length (`VARIANT_ITERATIONS`) times its own factor, the default
its own `distill.iterations`; `variant_config` scales both by --iterations_scale.
"""

import dataclasses
import pathlib

import ml_collections

from ccdd_jax.config import loader as config_loader
from ccdd_jax.config import validation

REPO = pathlib.Path(__file__).resolve().parent.parent

# setting -> (paper-literal config, default config or None = paper + DEFAULT_LEVERS).
SETTINGS = {
  "digits": ("configs/digits_paper.py", "configs/digits.py"),
  "cifar10_cpu": ("configs/cifar10_cpu_paper.py", "configs/cifar10_cpu.py"),
}

# "levers": trigger-safe experts, no twin term (beta 0), 4 carriers per pattern beyond IPC.
LEVERS = {
  "experts.trigger_safe_dsa": True,
  "distill.beta": 0.0,
  "distill.carriers_per_pattern": 4,
}
# "levers_safe": plus the carriers' corner kept out of DSA and out of the image updates.
SAFE_LEVERS = {**LEVERS, "distill.trigger_safe_dsa": True, "distill.freeze_trigger": True}
# "levers_b": plus eq. 10 form (b) with beta 0.5 over fine-pruning-enhanced experts whose
# last 5 epochs are normal training.
FORM_B_LEVERS = {
  **SAFE_LEVERS,
  "distill.beta": 0.5,
  "distill.eq10_form": "second_student",
  "experts.fp_normal_last_epochs": 5,
}
# The direct objective: 0.3 CE of the student on D_W plus 0.3 CE on clean training images.
DIRECT = {"distill.gamma_wm": 0.3, "distill.gamma_clean": 0.3}
# "levers_b_direct": levers_b plus the direct objective; the base of the
# "levers_b_direct_*" variants, each of which changes one thing.
LEVERS_B_DIRECT = {**FORM_B_LEVERS, **DIRECT}
# "matching": levers_b_direct with beta 1, the levers of configs/digits_matching.py (the
# watermark matched into the images, over the paper-literal config).
MATCHING_LEVERS = {**LEVERS_B_DIRECT, "distill.beta": 1.0}
# The "appended" embedding (beyond the paper): the clean distilled set plus k stamped
# copies of its own images per pattern, never distilled (no seeded slots).
APPENDED = {
  "distill.watermark_embedding": "appended",
  "distill.triggers_per_pattern": 0,
  "distill.carrier_source": "set",
}
# The "clean_label" embedding (method/crafting.py) as configs/digits_clean_label.py sets it:
# the clean distilled set of IPC 20, every image moved within craft_eps, key-derived queries.
CLEAN_LABEL = {
  "distill.ipc": 20,
  "distill.watermark_embedding": "clean_label",
  "distill.triggers_per_pattern": 0,
  "watermark.queries": "key_derived",
  "watermark.queries_per_pattern": 30,
  "distill.craft_eps": 0.15,
  "distill.craft_iterations": 150,
}
# Each setting's default over its paper-literal config (configs/digits.py on digits, with
# its own iterations): the appended embedding, with the carriers per pattern chosen per
# setting (9 on digits; 5 on the CIFAR-10 scale-down, where 7 patterns instead of 10 cut
# the carriers' cost).
DEFAULT_LEVERS = {
  "digits": {**APPENDED, "distill.carriers_per_pattern": 9},
  "cifar10_cpu": {**APPENDED, "distill.carriers_per_pattern": 5, "watermark.n_patterns": 7},
}
# The base length of the variants of each embedding (x their iterations_factor). Matching:
# configs/digits_matching.py's 300 on digits, the config's 200 on CIFAR-10; appended: the
# default's 600 on digits (the watermarked distillation it skips pays for them), 200 on
# CIFAR-10.
VARIANT_ITERATIONS = {
  ("digits", "matching"): 300,
  ("digits", "appended"): 600,
  ("cifar10_cpu", "matching"): 200,
  ("cifar10_cpu", "appended"): 200,
  ("digits", "clean_label"): 600,
  ("cifar10_cpu", "clean_label"): 200,
}


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  label: str
  fields: dict | None  # Over the paper-literal config; None = the setting's default config.
  iterations_factor: float = 1.0


# One lever at a time over the paper-literal config.
SINGLE_LEVERS = (
  Variant("default", "default: the clean distilled set + stamped carriers (appended)", None),
  Variant("paper", "paper: eq. 10 literal (a), β 0.5", {}),
  Variant("beta0", "β 0 (no twin term)", {"distill.beta": 0.0}),
  Variant(
    "second_student", "eq. 10 (b) second student, β 0.5", {"distill.eq10_form": "second_student"}
  ),
  Variant(
    "student_normalised",
    "eq. 10 (c) student-normalised, β 0.5",
    {"distill.eq10_form": "student_normalised"},
  ),
  Variant("clean_pool", "pool: 50% clean experts, β 0.5", {"distill.clean_expert_fraction": 0.5}),
  Variant(
    "safe_experts",
    "trigger-safe expert DSA, β 0",
    {"experts.trigger_safe_dsa": True, "distill.beta": 0.0},
  ),
  Variant(
    "carriers4", "β 0, 4 carriers/pattern", {"distill.beta": 0.0, "distill.carriers_per_pattern": 4}
  ),
  Variant("direct", "β 0, 0.3 CE(D_W) + 0.3 CE(clean)", {"distill.beta": 0.0, **DIRECT}),
)

# The levers together, and each combination with one more lever.
COMBINATIONS = (
  Variant("levers", "levers: trigger-safe experts, β 0, 4 carriers/pattern", dict(LEVERS)),
  Variant(
    "levers_carriers8",
    "levers, 8 carriers/pattern",
    {**LEVERS, "distill.carriers_per_pattern": 8},
  ),
  Variant("levers_direct", "levers + 0.3 CE(D_W) + 0.3 CE(clean)", {**LEVERS, **DIRECT}),
  Variant(
    "levers_fp_normal",
    "levers with β 0.5 (b), fp experts normal last 5 epochs",
    {
      **LEVERS,
      "distill.beta": 0.5,
      "distill.eq10_form": "second_student",
      "experts.fp_normal_last_epochs": 5,
    },
  ),
  Variant("levers_2x", "levers, 2x iterations", dict(LEVERS), 2.0),
  Variant(
    "levers_half_batch_2x",
    "levers, batch_syn 70 (half the set), 2x iterations",
    {**LEVERS, "distill.batch_syn": 70},
    2.0,
  ),
  Variant(
    "levers_safe",
    "levers + trigger-safe distill DSA, frozen corner",
    dict(SAFE_LEVERS),
  ),
  Variant(
    "levers_safe_carriers8",
    "levers_safe, 8 carriers/pattern",
    {**SAFE_LEVERS, "distill.carriers_per_pattern": 8},
  ),
  Variant("levers_b", "levers_safe + β 0.5 (b), fp experts normal last 5 epochs", FORM_B_LEVERS),
  Variant("levers_b_direct", "levers_b + 0.3 CE(D_W) + 0.3 CE(clean)", LEVERS_B_DIRECT),
  Variant("levers_b_2x", "levers_b, 2x iterations", dict(FORM_B_LEVERS), 2.0),
  Variant(
    "levers_b_carriers8",
    "levers_b, 8 carriers/pattern",
    {**FORM_B_LEVERS, "distill.carriers_per_pattern": 8},
  ),
  Variant(
    "levers_b_direct_carriers8",
    "levers_b + direct, 8 carriers/pattern",
    {**LEVERS_B_DIRECT, "distill.carriers_per_pattern": 8},
  ),
  Variant(
    "levers_b_direct_carriers8_1_5x",
    "levers_b + direct, 8 carriers/pattern, 1.5x iterations",
    {**LEVERS_B_DIRECT, "distill.carriers_per_pattern": 8},
    1.5,
  ),
  Variant(
    "levers_b_carriers8_2x",
    "levers_b, 8 carriers/pattern, 2x iterations",
    {**FORM_B_LEVERS, "distill.carriers_per_pattern": 8},
    2.0,
  ),
)

# levers_b_direct with one change each: length, carriers, lambda1, beta, soft labels.
LEVERS_B_DIRECT_TRADES = (
  Variant("levers_b_direct_2x", "levers_b_direct, 2x iterations", dict(LEVERS_B_DIRECT), 2.0),
  Variant(
    "levers_b_direct_carriers2",
    "levers_b_direct, 2 carriers/pattern",
    {**LEVERS_B_DIRECT, "distill.carriers_per_pattern": 2},
  ),
  Variant(
    "levers_b_direct_lambda1_half",
    "levers_b_direct over experts with λ1 0.5 (eq. 6)",
    {**LEVERS_B_DIRECT, "experts.lambda1": 0.5},
  ),
  Variant(
    "levers_b_direct_lambda1_2",
    "levers_b_direct over experts with λ1 2 (eq. 6)",
    {**LEVERS_B_DIRECT, "experts.lambda1": 2.0},
  ),
  Variant(
    "matching",
    "levers_b_direct with β 1 (= configs/digits_matching.py)",
    dict(MATCHING_LEVERS),
  ),
  # Learned soft labels (TESLA / DATM): from an expert's logits (DATM) or from one-hot.
  Variant(
    "levers_b_direct_soft_expert",
    "levers_b_direct + soft labels from the expert's logits, lr 2",
    {**LEVERS_B_DIRECT, "distill.soft_labels": "expert"},
  ),
  Variant(
    "levers_b_direct_soft_expert_lr20",
    "levers_b_direct + soft labels from the expert's logits, lr 20",
    {**LEVERS_B_DIRECT, "distill.soft_labels": "expert", "distill.lr_label": 20.0},
  ),
  Variant(
    "levers_b_direct_soft_one_hot",
    "levers_b_direct + soft labels from 5 one-hot, lr 2",
    {**LEVERS_B_DIRECT, "distill.soft_labels": "one_hot"},
  ),
)

# Beyond the paper: the pool of experts with split roles (the trigger slots learn from
# watermarked trajectories, the class images from clean ones), and carriers over clean
# experts only.
POOLS = (
  Variant(
    "split",
    "levers_b_direct + 50% clean experts, split roles",
    {**LEVERS_B_DIRECT, "distill.clean_expert_fraction": 0.5, "distill.split_roles": True},
  ),
  Variant(
    "split_wm70",
    "levers_b_direct + 30% clean experts, split roles",
    {**LEVERS_B_DIRECT, "distill.clean_expert_fraction": 0.3, "distill.split_roles": True},
  ),
  Variant(
    "levers_b_clean_experts",
    "levers_b's carriers over clean experts only (pool 100% clean)",
    {**FORM_B_LEVERS, "distill.clean_expert_fraction": 1.0},
  ),
)

# The appended embedding: how many carriers, from where, and the clean set's length.
APPENDED_VARIANTS = (
  *(
    Variant(
      f"appended_set{k}",
      f"appended: clean distilled set + {k} stamped copies of its images per pattern",
      {**APPENDED, "distill.carriers_per_pattern": k},
    )
    for k in (3, 5, 7, 9)
  ),
  Variant(
    "appended_train9",
    "appended: clean distilled set + 9 stamped training images per pattern",
    {**APPENDED, "distill.carrier_source": "train", "distill.carriers_per_pattern": 9},
  ),
  Variant(
    "appended_set9_half",
    "appended_set9 with half the iterations",
    {**APPENDED, "distill.carriers_per_pattern": 9},
    0.5,
  ),
)

# The clean-label frontier: the budget, the crafting's length, the patterns, the set's size and
# the architectures and augmentations crafted through.
CLEAN_LABEL_VARIANTS = (
  Variant("clean_label", "clean_label: IPC 20, ε 0.15, 150 crafting iterations", dict(CLEAN_LABEL)),
  *(
    Variant(
      f"clean_label_eps{round(eps * 100):03d}",
      f"clean_label, ε {eps}",
      {**CLEAN_LABEL, "distill.craft_eps": eps},
    )
    for eps in (0.05, 0.1, 0.2, 0.3)
  ),
  Variant(
    "clean_label_craft300",
    "clean_label, 300 crafting iterations",
    {**CLEAN_LABEL, "distill.craft_iterations": 300},
  ),
  Variant(
    "clean_label_n20",
    "clean_label, 20 patterns",
    {**CLEAN_LABEL, "watermark.n_patterns": 20},
  ),
  Variant(
    "clean_label_n20_craft300",
    "clean_label, 20 patterns, 300 crafting iterations",
    {**CLEAN_LABEL, "watermark.n_patterns": 20, "distill.craft_iterations": 300},
  ),
  Variant(
    "clean_label_ipc10",
    "clean_label over a clean set of IPC 10",
    {**CLEAN_LABEL, "distill.ipc": 10},
  ),
  Variant(
    "clean_label_two_archs",
    "clean_label crafted against ConvNet with and without instance norm in turn",
    {**CLEAN_LABEL, "distill.craft_models": "convnet,convnet:none"},
  ),
  Variant(
    "clean_label_three_augmentations",
    "clean_label crafted through DSA, no augmentation and translations in turn",
    {
      **CLEAN_LABEL,
      "distill.craft_augmentations": "color_crop_cutout_flip_scale_rotate,none,crop",
    },
  ),
)

VARIANTS = (
  SINGLE_LEVERS
  + COMBINATIONS
  + LEVERS_B_DIRECT_TRADES
  + POOLS
  + APPENDED_VARIANTS
  + CLEAN_LABEL_VARIANTS
)
BY_NAME = {v.name: v for v in VARIANTS}


def _path(relative: str) -> str:
  return str(REPO / relative)


def with_fields(config: ml_collections.ConfigDict, fields: dict) -> ml_collections.ConfigDict:
  """`config` with each "section.name" field of `fields` set (in place); unknown fields raise."""
  for field, value in fields.items():
    section, name = field.split(".")
    if name not in config[section]:
      raise KeyError(f"unknown config field {field}")
    config[section][name] = value
  return config


def default_config(setting: str, overrides=()) -> ml_collections.ConfigDict:
  """The setting's default: its default config file, or the paper config plus its
  DEFAULT_LEVERS."""
  paper, default = SETTINGS[setting]
  if default:
    return config_loader.load(_path(default), list(overrides))
  return with_fields(config_loader.load(_path(paper), list(overrides)), DEFAULT_LEVERS[setting])


def variant_iterations(setting: str, variant: Variant) -> int:
  """A field variant's length before --iterations_scale (VARIANT_ITERATIONS)."""
  embedding = (variant.fields or {}).get("distill.watermark_embedding", "matching")
  return round(VARIANT_ITERATIONS[setting, embedding] * variant.iterations_factor)


def variant_config(
  setting: str,
  variant: Variant,
  iterations_scale: float = 1.0,
  eval_seeds: int = 5,
  overrides=(),
) -> ml_collections.ConfigDict:
  """One variant's validated config (`overrides`: field=value strings applied to every variant)."""
  if variant.fields is None:
    config = default_config(setting, overrides)
    iterations = config.distill.iterations
  else:
    paper = config_loader.load(_path(SETTINGS[setting][0]), list(overrides))
    config = with_fields(paper, variant.fields)
    iterations = variant_iterations(setting, variant)
  config.distill.iterations = max(1, round(iterations * iterations_scale))
  config.eval.num_seeds = eval_seeds
  if config.attacks.num_seeds > eval_seeds:
    config.attacks.num_seeds = 0
  validation.validate(config)
  return config
