"""The distilled sets of a run: how the distill stage builds, saves and summarises each.

`distill_set` runs trajectory matching (distill.distill, eq. 9, 10) for one
set from its starting images (embedding.initial_set); `append_carriers`
builds the "appended" embedding's watermarked set from the clean one
(embedding.appended_set); `craft_set` the "clean_label" embedding's
(crafting.craft). Each writes `<name>.npz` and `<name>.png` and returns
the set's distill.json entry.
"""

import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccdd_jax import streams
from ccdd_jax.log import log
from ccdd_jax.method import augment
from ccdd_jax.method import crafting
from ccdd_jax.method import distill
from ccdd_jax.method import embedding
from ccdd_jax.method import key_queries
from ccdd_jax.method import models
from ccdd_jax.method import watermark
from ccdd_jax.run import context
from ccdd_jax.run import preemption
from ccdd_jax.run import reporting
from ccdd_jax.run import resume
from ccdd_jax.run import tensorboard
from ccdd_jax.run import workdir as workdir_lib


def distill_set(
  ctx: context.Context, name: str, kinds: tuple[str, str], trajectories: dict, resume_dir
) -> dict:
  """Distils set `name` over experts of `kinds` = (kind, twin kind); saves it (resumes)."""
  cfg, ds = ctx.config, ctx.dataset
  start, set_cfg = time.time(), embedding.set_config(cfg.distill, kinds[0] != "clean")
  store, expert = resume.DistillStore(pathlib.Path(resume_dir) / name), trajectories[kinds[0]]
  matched = (expert, trajectories[kinds[1]] if set_cfg.beta else expert)
  matched += (trajectories["clean"],) if set_cfg.clean_expert_fraction else ()
  pool = (ds.train_images, ds.train_labels, ds.num_classes, *ctx.patterns())
  init_u8, labels, from_trigger = embedding.initial_set(
    set_cfg, *pool, ctx.np_rng(streams.INITIAL_SET), ctx.np_rng(streams.CARRIERS)
  )
  aux = embedding.aux_inputs(set_cfg, from_trigger, ctx.patch_size, ctx.expert_inputs)
  log(
    f"[distill] {name}: {len(labels)} images from {expert.shape[0]} {kinds[0]} experts, "
    f"{set_cfg.iterations} iterations x {set_cfg.syn_steps} steps"
    + (f", resuming at iteration {store.latest()}" if store.latest() else "")
  )
  init_images = ctx.preprocess.apply(init_u8)
  init_logits = embedding.initial_label_logits(
    set_cfg,
    labels,
    ds.num_classes,
    lambda: ctx.net.apply_flat(expert[0, -1], init_images),  # Epoch t_max + M (DATM).
  )
  with preemption.naming(name):  # Stopped: "at iteration 37 of 200 (distilled)".
    images, lr, losses, label_logits = distill.distill(
      set_cfg,
      ctx.net.apply_flat,
      cfg.dsa,
      init_images,
      labels,
      matched,
      ctx.jax_key(streams.DISTILL),
      reporting.progress_printer(name, set_cfg.iterations, store.latest()),
      aux,
      store,
      ctx.mesh,
      label_logits=init_logits,
      monitor=tensorboard.distill_monitor(
        ctx.workdir, name, set_cfg, ctx.preprocess.to_pixels, labels, from_trigger
      ),
      should_stop=preemption.should_stop,
    )
  arrays = (images, labels, lr, from_trigger, losses, label_logits)
  return save(ctx, name, set_cfg, arrays, start)


def append_carriers(ctx: context.Context) -> dict:
  """The "appended" embedding's watermarked set: the clean distilled set plus its carriers."""
  ds, start = ctx.dataset, time.time()
  set_cfg = embedding.set_config(ctx.config.distill, True)
  clean = workdir_lib.load_distilled(ctx.workdir, "clean_distilled")
  pool = (ds.train_images, ds.train_labels, *ctx.patterns(), ctx.preprocess.apply)
  images, labels, carriers = embedding.appended_set(
    set_cfg, clean, *pool, ctx.np_rng(streams.CARRIERS)
  )
  log(f"[distill] distilled: the clean distilled set + {carriers.sum()} stamped carriers")
  arrays = (images, labels, float(clean["lr"]), carriers, clean["losses"], None)
  return {**save(ctx, "distilled", set_cfg, arrays, start), "embedding": "appended"}


def craft_set(ctx: context.Context, resume_dir) -> dict:
  """The "clean_label" embedding's watermarked set: the clean distilled set, every image moved
  within distill.craft_eps by crafting.craft against the key's "craft" queries (resumes)."""
  cfg, ds, d, start = ctx.config, ctx.dataset, ctx.config.distill, time.time()
  set_cfg = embedding.set_config(d, True)
  clean = workdir_lib.load_distilled(ctx.workdir, "clean_distilled")
  labels, lr = np.asarray(clean["labels"]), float(clean["lr"])
  patterns, pattern_labels = ctx.patterns()
  noise = cfg.watermark.query_noise
  pixels, ids = key_queries.key_query_images(
    ctx.key, patterns, ds.image_shape, d.craft_queries, noise, "craft"
  )
  arrays = (clean["images"], labels, lr, ctx.preprocess.apply(pixels), pattern_labels[ids])
  arrays += (ctx.train_x, ds.train_labels)
  data = tuple(
    jnp.asarray(a, jnp.int32 if np.asarray(a).dtype.kind in "iu" else jnp.float32) for a in arrays
  )
  eps = np.float32(d.craft_eps) / np.asarray(ctx.preprocess.std, np.float32)  # Input units.
  objectives, init_fns, turns = crafting_turns(ctx)
  store = resume.DistillStore(pathlib.Path(resume_dir) / "distilled", crafting.HISTORY_COLUMNS)
  log(
    f"[distill] distilled: crafting the {len(labels)} clean distilled images within "
    f"{d.craft_eps:g} per pixel, {d.craft_iterations} iterations x "
    f"{d.craft_epochs or cfg.eval.epochs} epochs of training ({turns} in turn)"
    + (f", resuming at iteration {store.latest()}" if store.latest() else "")
  )
  bar = reporting.progress_printer("distilled (crafting)", d.craft_iterations, store.latest())
  with preemption.naming("distilled"):
    images, history = crafting.craft(
      d,
      objectives,
      init_fns,
      data,
      eps,
      ctx.jax_key(streams.CRAFT),
      store=store,
      progress=lambda it, terms, _: bar(it, terms[0]),
      should_stop=preemption.should_stop,
    )
  carriers = np.ones(len(labels), bool)  # Every image carries the watermark; none is stamped.
  entry = save(
    ctx, "distilled", set_cfg, (images, labels, lr, carriers, clean["losses"], None), start
  )
  moved = np.abs(
    ctx.preprocess.to_pixels(images, clip=False)
    - ctx.preprocess.to_pixels(clean["images"], clip=False)
  )
  entry["crafting"] = {
    "eps": d.craft_eps,
    "max_pixel_change": float(moved.max()),
    "mean_pixel_change": float(moved.mean()),
    "query_ce_first": float(history[:10, 0].mean()),
    "query_ce_last": float(history[-10:, 0].mean()),
    "clean_ce_last": float(history[-10:, 1].mean()),
  }
  return {**entry, "embedding": "clean_label"}


def crafting_turns(ctx: context.Context) -> tuple[tuple, tuple, str]:
  """The crafting's (objectives, init_fns, description): turn t trains architecture t mod k_a
  of distill.craft_models with DSA strategy t mod k_s of distill.craft_augmentations."""
  cfg, d = ctx.config, ctx.config.distill
  archs = models.eval_architectures(d.craft_models, cfg.model.name, "distill.craft_models")
  strategies = augment.strategy_list(
    d.craft_augmentations, cfg.dsa.strategy, "distill.craft_augmentations"
  )
  networks = [ctx.network(arch) for arch in archs]
  objectives, init_fns, names = [], [], []
  for t in range(math.lcm(len(archs), len(strategies))):
    net, strategy = networks[t % len(archs)], strategies[t % len(strategies)]
    dsa = cfg.dsa
    if strategy != cfg.dsa.strategy:
      dsa = ml_collections.ConfigDict({**cfg.dsa.to_dict(), "strategy": strategy})
    objectives.append(crafting.make_objective(net.apply, dsa, cfg.eval, d))
    init_fns.append(lambda k, n=net: jax.tree_util.tree_map(lambda x: x[0], n.init_params(k, 1)))
    names.append(net.arch if len(strategies) == 1 else f"{net.arch} with DSA {strategy}")
  return tuple(objectives), tuple(init_fns), ", ".join(names)


def save(
  ctx: context.Context, name: str, set_cfg: ml_collections.ConfigDict, arrays: tuple, start: float
) -> dict:
  """Writes `<name>.npz` and `<name>.png`; returns the set's distill.json entry.

  `arrays` = (images, labels, lr, from_trigger, losses, label_logits or None);
  `start` = when the set's work began (time.time()).
  """
  images, labels, lr, from_trigger, losses, logits = arrays
  ds, patterns = ctx.dataset, ctx.patterns()[0]
  workdir_lib.save_distilled(
    ctx.workdir, name, images, labels, lr, from_trigger, losses, ctx.preprocess, logits
  )
  pixels = ctx.preprocess.to_pixels(images)
  title = f"{name} ({ds.name}, IPC {set_cfg.ipc}, {len(labels)} images)"
  reporting.save_grid(
    ctx.workdir / f"{name}.png", pixels, labels, ds.class_names, from_trigger, title
  )
  visibility = watermark.trigger_visibility(pixels, patterns)
  seconds = time.time() - start
  entry = reporting.distill_summary(losses, lr, visibility, np.asarray(from_trigger), seconds)
  if logits is not None:
    entry["soft_labels"] = embedding.soft_label_summary(logits, labels)
  log(reporting.distill_line(name, entry))
  return entry
