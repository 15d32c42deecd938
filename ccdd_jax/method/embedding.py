"""How the watermark enters a distilled set: its starting images, carriers and levers.

"matching" (the paper): the set starts from real images of each class
(`init_synthetic`, optionally with slots seeded from D_W and carriers
beyond IPC, `initial_set`) and is distilled against watermarked experts
(distill.py); `aux_inputs` builds the levers' extra inputs of each update
and `set_config` turns the levers off for the clean set. "appended" (beyond
the paper): the clean distilled set plus stamped carriers that are never
distilled (`appended_set`), so only clean experts are trained
(`expert_kinds`). "clean_label" (beyond the paper): the clean distilled set
with every image moved within an l_inf ball, crafted by method/crafting.py
(clean experts only too). Learned soft labels start from `initial_label_logits`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.method import distill
from ccdd_jax.method import experts
from ccdd_jax.method import watermark

# How the watermark enters the distilled set (distill.watermark_embedding).
WATERMARK_EMBEDDINGS = ("matching", "appended", "clean_label")
# The embeddings built from the clean distilled set, which need clean experts only.
FROM_CLEAN_SET = ("appended", "clean_label")


# How the distilled set's labels start (distill.soft_labels): "" = hard labels, not learned.
SOFT_LABELS = ("", "one_hot", "expert")


# The levers a clean distilled set never uses, with their "off" values.
WATERMARK_ONLY = {
  "beta": 0.0,
  "triggers_per_pattern": 0,
  "carriers_per_pattern": 0,
  "clean_expert_fraction": 0.0,
  "split_roles": False,
  "gamma_wm": 0.0,
  "gamma_clean": 0.0,
  "freeze_trigger": False,
  "trigger_safe_dsa": False,
}


def expert_kinds(distill_config: ml_collections.ConfigDict, matched: bool = False) -> tuple:
  """The expert kinds the experts stage trains, or with `matched` those distillation reads.

  "appended" and "clean_label" need clean experts only; "matching" trains every
  kind and reads the fine-pruning-enhanced twins only where beta > 0.
  """
  if distill_config.get("watermark_embedding") in FROM_CLEAN_SET:
    return ("clean",)
  if not matched:
    return experts.KINDS
  return ("clean", "watermarked") + ("fp_enhanced",) * bool(distill_config.beta)


def init_synthetic(
  train_images: np.ndarray,
  train_labels: np.ndarray,
  num_classes: int,
  ipc: int,
  rng: np.random.Generator,
  *,
  patterns: np.ndarray | None = None,
  pattern_labels: np.ndarray | None = None,
  triggers_per_pattern: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Picks real uint8 images per class; optionally seeds slots with D_W images.

  With `triggers_per_pattern` = k > 0 (an option beyond the paper), k slots
  of class y_i are filled with training images of other classes stamped
  with pattern i, so the watermark starts inside the synthetic set. Returns
  images, labels and a bool mask of the trigger slots.
  """
  images, labels, from_trigger = [], [], []
  wm_count = np.zeros(num_classes, np.int64)
  if triggers_per_pattern:
    for label in pattern_labels:
      wm_count[label] += triggers_per_pattern
    if wm_count.max() > ipc:
      raise CCDDError(
        f"distill.triggers_per_pattern={triggers_per_pattern} needs {wm_count.max()} "
        f"slots in one class but ipc={ipc}"
      )
  for c in range(num_classes):
    pool = np.flatnonzero(train_labels == c)
    n_real = ipc - wm_count[c]
    if len(pool) < n_real:
      raise CCDDError(f"class {c} has {len(pool)} training images, fewer than ipc={ipc}")
    chosen = rng.choice(pool, size=n_real, replace=False)
    images.append(train_images[chosen])
    labels.append(np.full(n_real, c))
    from_trigger.append(np.zeros(n_real, bool))
    for i in np.flatnonzero(np.asarray(pattern_labels if triggers_per_pattern else []) == c):
      carriers = rng.choice(
        np.flatnonzero(train_labels != c), size=triggers_per_pattern, replace=False
      )
      images.append(
        watermark.stamp(train_images[carriers], patterns, np.full(triggers_per_pattern, i))
      )
      labels.append(np.full(triggers_per_pattern, c))
      from_trigger.append(np.ones(triggers_per_pattern, bool))
  return (
    np.concatenate(images),
    np.concatenate(labels).astype(np.int64),
    np.concatenate(from_trigger),
  )


def add_carriers(
  images: np.ndarray,
  labels: np.ndarray,
  from_trigger: np.ndarray,
  pool_images: np.ndarray,
  pool_labels: np.ndarray,
  patterns: np.ndarray,
  pattern_labels: np.ndarray,
  per_pattern: int,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Appends `per_pattern` stamped carriers per pattern BEYOND the IPC images.

  Carrier j of pattern i is an image of the pool (the training split, or the
  set's own real slots) of the j-th class of a random order of the classes
  other than y_i, stamped with pattern i and labelled y_i.
  """
  if not per_pattern:
    return images, labels, from_trigger
  classes = np.unique(pool_labels)
  new_images, new_labels = [], []
  for i, target in enumerate(pattern_labels):
    others = rng.permutation(classes[classes != target])
    for j in range(per_pattern):
      pool = np.flatnonzero(pool_labels == others[j % len(others)])
      chosen = pool_images[rng.choice(pool, 1)]
      new_images.append(watermark.stamp(chosen, patterns, np.array([i])))
      new_labels.append(target)
  return (
    np.concatenate([images, *new_images]),
    np.concatenate([labels, np.asarray(new_labels, labels.dtype)]),
    np.concatenate([from_trigger, np.ones(len(new_labels), bool)]),
  )


def initial_set(
  set_config: ml_collections.ConfigDict,
  train_images: np.ndarray,
  train_labels: np.ndarray,
  num_classes: int,
  patterns: np.ndarray,
  pattern_labels: np.ndarray,
  rng: np.random.Generator,
  carrier_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The set's uint8 starting images: `init_synthetic`, then the carriers beyond IPC."""
  images, labels, from_trigger = init_synthetic(
    train_images,
    train_labels,
    num_classes,
    set_config.ipc,
    rng,
    patterns=patterns,
    pattern_labels=pattern_labels,
    triggers_per_pattern=set_config.triggers_per_pattern,
  )
  own = set_config.carrier_source == "set"
  pool = (images[~from_trigger], labels[~from_trigger]) if own else (train_images, train_labels)
  return add_carriers(
    images,
    labels,
    from_trigger,
    *pool,
    patterns,
    pattern_labels,
    set_config.carriers_per_pattern,
    carrier_rng,
  )


def appended_set(
  set_config: ml_collections.ConfigDict,
  clean: dict,
  train_images: np.ndarray,
  train_labels: np.ndarray,
  patterns: np.ndarray,
  pattern_labels: np.ndarray,
  to_inputs: Callable[[np.ndarray], np.ndarray],
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The "appended" embedding: the clean distilled set plus its stamped carriers.

  `clean` holds the clean distilled set's network inputs `images`, their [0, 1]
  `pixels` and `labels`. Carrier j of pattern i (`add_carriers`) is a training
  image or, with carrier_source "set", a clean distilled image (its pixels
  rounded to uint8) of another class, stamped with pattern i, labelled y_i and
  mapped to inputs by `to_inputs`; the carriers are never distilled. Returns
  images, labels and the carrier mask (`from_trigger`).
  """
  if set_config.carrier_source == "set":
    pool = (np.round(np.clip(clean["pixels"], 0, 1) * 255).astype(np.uint8), clean["labels"])
  else:
    pool = (train_images, train_labels)
  none = (np.zeros((0, *pool[0].shape[1:]), np.uint8), np.zeros(0, np.int64), np.zeros(0, bool))
  carriers, carrier_labels, _ = add_carriers(
    *none, *pool, patterns, pattern_labels, set_config.carriers_per_pattern, rng
  )
  images = np.concatenate([clean["images"], to_inputs(carriers).astype(clean["images"].dtype)])
  labels = np.concatenate([np.asarray(clean["labels"], np.int64), carrier_labels])
  from_trigger = np.r_[np.zeros(len(clean["labels"]), bool), np.ones(len(carrier_labels), bool)]
  return images, labels, from_trigger


def set_config(distill_config: ml_collections.ConfigDict, watermarked: bool):
  """The config of one set: the clean distilled set is MTT, without the watermark's levers."""
  config = ml_collections.ConfigDict(distill_config.to_dict())
  if not watermarked:
    config.update(WATERMARK_ONLY)
  return config


def aux_inputs(
  set_config: ml_collections.ConfigDict, from_trigger: np.ndarray, patch: int, inputs: dict
) -> distill.Aux:
  """What the set's levers add to each distillation update (all None with them off).

  `inputs` holds normalised `train_images` / `train_labels` and D_W of the
  training split, `wm_images` / `wm_labels` (the experts' inputs: never the
  held-out images that verification uses); `patch` is the trigger's side.
  """
  corner = watermark.corner_mask(inputs["train_images"].shape[1:3], patch)
  trigger_mask = from_trigger[:, None, None, None].astype(np.float32) * corner
  slots = from_trigger.any()
  direct_wm, direct_clean = set_config.gamma_wm, set_config.gamma_clean
  return distill.Aux(
    trigger_mask=trigger_mask if set_config.trigger_safe_dsa and slots else None,
    grad_mask=1.0 - trigger_mask if set_config.freeze_trigger and slots else None,
    trigger_slots=(
      from_trigger[:, None, None, None].astype(np.float32) if set_config.split_roles else None
    ),
    wm_images=inputs["wm_images"] if direct_wm else None,
    wm_labels=inputs["wm_labels"] if direct_wm else None,
    clean_images=inputs["train_images"] if direct_clean else None,
    clean_labels=inputs["train_labels"] if direct_clean else None,
  )


def initial_label_logits(
  distill_config: ml_collections.ConfigDict,
  labels: np.ndarray,
  num_classes: int,
  expert_logits: Callable[[], np.ndarray],
) -> np.ndarray | None:
  """The learned labels' starting logits [N, K] (distill.soft_labels), or None for hard labels.

  "one_hot": label_logit_scale * one_hot(labels); "expert": `expert_logits()`,
  an expert's logits on the initial images (DATM's initialisation).
  """
  if not distill_config.soft_labels:
    return None
  if distill_config.soft_labels == "one_hot":
    return distill_config.label_logit_scale * np.eye(num_classes, dtype=np.float32)[labels]
  if distill_config.soft_labels == "expert":
    return np.asarray(expert_logits(), np.float32)
  raise ValueError(f"unknown soft_labels {distill_config.soft_labels!r}")


def soft_label_summary(label_logits: np.ndarray, labels: np.ndarray) -> dict:
  """Mean top probability of learned labels, and the fraction whose top class is the slot's."""
  probs = np.asarray(jax.nn.softmax(jnp.asarray(label_logits)))
  return {
    "mean_top_probability": float(probs.max(axis=1).mean()),
    "agree_with_slot_label": float((probs.argmax(axis=1) == np.asarray(labels)).mean()),
  }
