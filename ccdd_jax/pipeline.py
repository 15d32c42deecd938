"""The stages of the method, run from a config into a workdir.

  keygen    -> <workdir>/owner.key (or --key_file), mode 0600
  experts   -> <workdir>/trajectories/{clean,watermarked,fp_enhanced}/NNNN (Orbax), experts.json
  distill   -> distilled.npz, clean_distilled.npz, distilled.png, clean_distilled.png
  evaluate  -> models/<architecture>/<set> (Orbax), evaluation.json
  verify    -> verification.json, report.json, report.md

Each stage reads only what earlier stages wrote, so any stage can be rerun.
"""

import json
import os
import pathlib
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import ml_collections
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax import data as data_lib
from ccdd_jax import distill as distill_lib
from ccdd_jax import evaluate as evaluate_lib
from ccdd_jax import experts as experts_lib
from ccdd_jax import inner_loop
from ccdd_jax import models
from ccdd_jax import trajectories
from ccdd_jax import watermark

STAGES = ("keygen", "experts", "distill", "evaluate", "verify")
SETS = ("distilled", "clean_distilled", "real")


def log(message: str) -> None:
  """Progress for people, on stderr."""
  print(message, file=sys.stderr, flush=True)


class Network:
  """One architecture: its Flax module, pure apply and parameter shapes."""

  def __init__(self, label: str, model, image_shape: tuple):
    self.label = label
    self.model = model
    self.apply = models.make_apply(model)
    self.image_shape = image_shape

  def init_params(self, rng: jax.Array, count: int) -> Any:
    """`count` stacked initial parameter trees."""
    init = lambda r: models.init_params(self.model, self.image_shape, r)
    return jax.jit(jax.vmap(init))(jax.random.split(rng, count))

  def like_params(self) -> Any:
    return jax.eval_shape(lambda: models.init_params(
        self.model, self.image_shape, jax.random.PRNGKey(0)))


def eval_architectures(config: ml_collections.ConfigDict) -> list[str]:
  """The labels `eval.models` lists ("" = the distillation model only), primary first."""
  primary = config.model.name
  labels = [l.strip() for l in config.eval.models.split(",") if l.strip()] or [primary]
  for label in labels:
    name, _, norm = label.partition(":")
    norms = ("", "instance", "none") if name in ("convnet", "alexnet") else (
        "", "instance", "batch", "none")
    if name not in models.MODEL_NAMES or norm not in norms:
      raise CCDDError(f"invalid config: eval.models entry {label!r}: use one of "
                      f"{', '.join(models.MODEL_NAMES)}, optionally with :instance, :batch "
                      f"(resnet18, vgg11) or :none")
  if len(set(labels)) != len(labels):
    raise CCDDError(f"invalid config: eval.models lists an architecture twice: "
                    f"{config.eval.models!r}")
  return sorted(labels, key=lambda l: l != primary)


class Context:
  """What every stage derives from the config: data, model, watermark patterns."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path,
               key_file: pathlib.Path):
    self.config = config
    self.workdir = workdir
    self.key_file = key_file
    self.dataset = data_lib.load_dataset(config.data)
    ds = self.dataset
    self.net = Network(config.model.name, models.build_model(config.model, ds.num_classes),
                       ds.image_shape)
    self.model, self.apply = self.net.model, self.net.apply
    side = ds.image_shape[0]
    self.patch_size = config.watermark.patch_size or side // 2  # Paper, Stage I.
    self.preprocess = data_lib.fit_preprocessor(ds.train_images, zca=config.data.zca,
                                                zca_eps=config.data.zca_eps,
                                                cache_dir=config.data.cache_dir)
    self.train_x = self.preprocess.apply(ds.train_images)
    self.test_x = self.preprocess.apply(ds.test_images)
    self.rng = jax.random.PRNGKey(config.seed)
    self._key = None
    self._predictors = {}

  def np_rng(self, *stream: int) -> np.random.Generator:
    """A numpy generator for one named use, derived from the config seed."""
    return np.random.default_rng([self.config.seed, *stream])

  def normalize(self, images_uint8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> network inputs (mean/std normalisation or ZCA, as configured)."""
    return self.preprocess.apply(images_uint8)

  def network(self, label: str) -> Network:
    """The evaluation architecture an `eval.models` label names."""
    cfg = self.config
    if label == cfg.model.name:
      return self.net
    name, _, norm = label.partition(":")
    if name == "convnet":
      model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
      model_cfg.name, model_cfg.norm = "convnet", norm or cfg.model.norm
      model = models.build_model(model_cfg, self.dataset.num_classes)
    else:
      model = models.build_named(name, self.dataset.num_classes, norm=norm or "instance",
                                 conv_impl=cfg.model.conv_impl, width=cfg.eval.width)
    return Network(label, model, self.dataset.image_shape)

  @property
  def key(self) -> bytes:
    if self._key is None:
      self._key = watermark.read_key_file(self.key_file)
    return self._key

  def patterns(self, key: bytes | None = None):
    """Trigger patterns and labels of `key` (default: the owner's)."""
    return watermark.expand_key(key or self.key, self.config.watermark.n_patterns,
                                self.patch_size, self.dataset.image_shape[-1],
                                self.dataset.num_classes)

  def init_params(self, rng: jax.Array, count: int) -> Any:
    """`count` stacked initial parameter trees of the distillation model."""
    return self.net.init_params(rng, count)

  def like_params(self) -> Any:
    return self.net.like_params()

  def predictor(self, apply: Callable) -> Callable[[Any, np.ndarray], np.ndarray]:
    """`evaluate.make_predictor(apply)`, made once per network, so compiled once per shape."""
    if apply not in self._predictors:
      self._predictors[apply] = evaluate_lib.make_predictor(apply)
    return self._predictors[apply]

  def accuracy_and_acc_w(self, stacked_params: Any, apply=None) -> tuple[list, list]:
    """Per-network test accuracy and the paper's Acc_W on all stamped test images."""
    ds = self.dataset
    apply = apply or self.apply
    patterns, labels = self.patterns()
    triggers, pattern_ids = watermark.trigger_set(ds.test_images, ds.test_labels, patterns,
                                                  labels, None, self.np_rng(9))
    predict = self.predictor(apply)
    preds = predict(stacked_params, self.test_x)
    acc = (preds == ds.test_labels[None]).mean(axis=1)
    trig_preds = predict(stacked_params, self.normalize(triggers))
    acc_w = [watermark.watermark_accuracy(p, pattern_ids, labels) for p in trig_preds]
    return [float(a) for a in acc], [float(a) for a in acc_w]


# ----------------------------------------------------------------------------
# Stages.
# ----------------------------------------------------------------------------


def stage_keygen(ctx: Context) -> dict:
  """Writes a fresh 32-byte key with mode 0600, unless the key file exists."""
  if ctx.key_file.exists():
    watermark.read_key_file(ctx.key_file)  # Validates it.
    log(f"[keygen] using the existing key file {ctx.key_file}")
  else:
    watermark.write_key_file(ctx.key_file, watermark.generate_key())
    log(f"[keygen] wrote a new key to {ctx.key_file} (mode 0600; keep it secret)")
  return {"key_fingerprint": watermark.key_fingerprint(ctx.key)}


def stage_experts(ctx: Context) -> dict:
  """Trains clean, watermarked and fine-pruning-enhanced experts; saves trajectories."""
  cfg, ds = ctx.config, ctx.dataset
  ecfg = cfg.experts
  patterns, labels = ctx.patterns()
  wm_images, wm_labels, _ = watermark.make_watermark_set(
      ds.train_images, ds.train_labels, patterns, labels, cfg.watermark.ratio, ctx.np_rng(1))
  prune_idx = ctx.np_rng(2).choice(len(ds.train_labels),
                                   size=min(ecfg.prune_examples, len(ds.train_labels)),
                                   replace=False)
  data = {"train_images": jnp.asarray(ctx.train_x),
          "train_labels": jnp.asarray(ds.train_labels, jnp.int32),
          "wm_images": jnp.asarray(ctx.normalize(wm_images)),
          "wm_labels": jnp.asarray(wm_labels, jnp.int32),
          "prune_images": jnp.asarray(ctx.train_x[prune_idx])}
  rng_init, rng_train = jax.random.split(jax.random.fold_in(ctx.rng, 1))
  init = ctx.init_params(rng_init, ecfg.num_experts)
  root = ctx.workdir / "trajectories"
  summary = {"d_w_size": int(len(wm_labels)), "d_c_size": int(len(ds.train_labels))}
  anchors = init
  for i, kind in enumerate(experts_lib.KINDS):
    start = time.time()
    log(f"[experts] training {ecfg.num_experts} {kind} experts x {ecfg.epochs} epochs "
        f"(|D_C| = {len(ds.train_labels)}, |D_W| = {len(wm_labels)}) ...")

    def progress(done, total, kind=kind, start=start):
      if total > 1 and (done == total or done % max(1, total // 4) == 0):
        log(f"[experts] {kind}: {done}/{total} groups done ({time.time() - start:.0f} s)")

    stacked = experts_lib.train_experts(kind, ecfg, ctx.apply, cfg.dsa, init, anchors,
                                        jax.random.fold_in(rng_train, i), data,
                                        concurrency=cfg.concurrency, on_group_done=progress)
    stacked = jax.device_get(stacked)
    final = jax.tree_util.tree_map(lambda x: x[:, -1], stacked)
    acc, acc_w = ctx.accuracy_and_acc_w(final)
    if kind == "clean":
      anchors = final  # theta0 of eq. 4: the clean expert from the same init.
    trajectories.save_stacked(root, kind, stacked, overwrite=True, metadata_per_expert=[
        {"test_acc": a, "acc_w": w} for a, w in zip(acc, acc_w)])
    summary[kind] = {"acc": evaluate_lib.summarize(acc), "acc_w": evaluate_lib.summarize(acc_w),
                     "seconds": time.time() - start}
    log(f"[experts] {kind}: Acc {100 * np.mean(acc):.1f}% Acc_W {100 * np.mean(acc_w):.1f}% "
        f"({time.time() - start:.0f} s)")
  write_json(ctx.workdir / "experts.json", summary)
  return summary


def flat_trajectories(ctx: Context, kind: str, epochs: int) -> np.ndarray:
  """Stored trajectories of `kind` as flat parameter vectors [experts, epochs, P]."""
  stacked = trajectories.load_trajectories(ctx.workdir / "trajectories", kind,
                                           ctx.like_params(), epochs=range(epochs))
  flatten = lambda p: ravel_pytree(p)[0]
  return np.asarray(jax.vmap(jax.vmap(flatten))(stacked))


def stage_distill(ctx: Context) -> dict:
  """Distils the watermarked set (eq. 9, 10) and, for comparison, a clean one."""
  cfg, ds = ctx.config, ctx.dataset
  dcfg = cfg.distill
  epochs = dcfg.max_start_epoch + dcfg.expert_epochs + 1
  _, unravel = ravel_pytree(jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), ctx.like_params()))
  apply_flat = lambda w, x: ctx.apply(unravel(w), x)
  patterns, pattern_labels = ctx.patterns()

  def distill_set(name, kind, twin_kind):
    start = time.time()
    set_cfg = ml_collections.ConfigDict(dcfg.to_dict())
    if name == "clean_distilled":
      set_cfg.beta = 0.0
      set_cfg.triggers_per_pattern = 0
    expert = flat_trajectories(ctx, kind, epochs)
    twin = flat_trajectories(ctx, twin_kind, epochs) if set_cfg.beta else expert
    init_u8, labels, from_trigger = distill_lib.init_synthetic(
        ds.train_images, ds.train_labels, ds.num_classes, dcfg.ipc, ctx.np_rng(3),
        patterns=patterns, pattern_labels=pattern_labels,
        triggers_per_pattern=set_cfg.triggers_per_pattern)
    log(f"[distill] {name}: {len(labels)} images from {expert.shape[0]} {kind} experts, "
        f"{dcfg.iterations} iterations x {dcfg.syn_steps} steps")
    images, lr, losses = distill_lib.distill(
        set_cfg, apply_flat, cfg.dsa, ctx.normalize(init_u8), labels, (expert, twin),
        jax.random.fold_in(ctx.rng, 2), progress=progress_printer(name, dcfg.iterations))
    np.savez(ctx.workdir / f"{name}.npz", images=images, labels=labels, lr=np.float32(lr),
             from_trigger=from_trigger, losses=np.asarray(losses),
             pixels=ctx.preprocess.to_pixels(images), **ctx.preprocess.as_arrays())
    save_grid(ctx.workdir / f"{name}.png", ctx.preprocess.to_pixels(images), labels, ds,
              from_trigger, title=f"{name} ({ds.name}, IPC {dcfg.ipc})")
    first, last = losses[:20].mean(axis=0), losses[-20:].mean(axis=0)
    visibility = watermark.trigger_visibility(ctx.preprocess.to_pixels(images), patterns)
    entry = {"trigger_visibility": {
                 "mean": float(visibility.mean()),
                 "trigger_slots": float(visibility[from_trigger].mean())
                                  if from_trigger.any() else None,
                 "real_slots": float(visibility[~from_trigger].mean())},
             "lr": lr, "loss_first": float(first[0]), "loss_last": float(last[0]),
             "expert_term_first": float(first[1]), "expert_term_last": float(last[1]),
             "twin_term_first": float(first[2]), "twin_term_last": float(last[2]),
             "seconds": time.time() - start}
    log(f"[distill] {name}: eq. 10 loss {first[0]:.3f} -> {last[0]:.3f} (expert term "
        f"{first[1]:.3f} -> {last[1]:.3f}, twin term {first[2]:.3f} -> {last[2]:.3f}), "
        f"learned lr {lr:.4g}, trigger visibility {visibility.mean():.2f} "
        f"({time.time() - start:.0f} s)")
    return entry

  # The two sets are independent: on CPU they run at once (`concurrency`).
  jobs = (("distilled", "watermarked", "fp_enhanced"), ("clean_distilled", "clean", "clean"))
  entries = experts_lib.run_concurrently(distill_set, list(jobs),
                                         experts_lib.resolve_concurrency(cfg.concurrency))
  summary = {job[0]: entry for job, entry in zip(jobs, entries)}
  write_json(ctx.workdir / "distill.json", summary)
  for stale in ("evaluation.json", "verification.json"):  # They describe the old sets.
    (ctx.workdir / stale).unlink(missing_ok=True)
  return summary


def load_distilled(ctx: Context, name: str) -> dict:
  """Reads a distilled set written by the distill stage."""
  path = ctx.workdir / f"{name}.npz"
  if not path.is_file():
    raise CCDDError(f"no distilled set at {path}: run --stage=distill first")
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def model_dir(ctx: Context, label: str, name: str) -> pathlib.Path:
  """Where the evaluated networks of one architecture and set are saved."""
  return ctx.workdir / "models" / label.replace(":", "_") / name


def stage_evaluate(ctx: Context) -> dict:
  """Trains fresh networks of each `eval.models` architecture on each set; Acc / Acc_W.

  The real-data baseline is trained for the distillation model only (and for
  every architecture with `eval.real_all_models`). Results merge into
  evaluation.json, so more architectures can be evaluated later.
  """
  cfg, ds = ctx.config, ctx.dataset
  ecfg = cfg.eval
  sets = {name: load_distilled(ctx, name) for name in SETS[:2]}
  summary = read_json(ctx.workdir / "evaluation.json")
  for label in eval_architectures(cfg):
    net = ctx.network(label)
    init = net.init_params(jax.random.fold_in(ctx.rng, 3), ecfg.num_seeds)
    with_real = label == cfg.model.name or ecfg.real_all_models
    summary[label] = {}
    trainers = {}
    for name in SETS if with_real else SETS[:2]:
      start = time.time()
      if name == "real":
        images, labels, lr, epochs = (ctx.train_x, ds.train_labels, ecfg.real_lr,
                                      ecfg.real_epochs)
        batch_size = ecfg.real_batch_size
      else:
        s = sets[name]
        images, labels, lr, epochs = s["images"], s["labels"], float(s["lr"]), ecfg.epochs
        batch_size = ecfg.batch_size
      log(f"[evaluate] {label} on {name}: {ecfg.num_seeds} networks x {epochs} epochs on "
          f"{len(labels)} images (lr {lr:.4g}) ...")
      if (epochs, batch_size) not in trainers:  # The two distilled sets share one.
        trainers[epochs, batch_size] = evaluate_lib.make_networks_trainer(
            net.apply, cfg.dsa, epochs=epochs, batch_size=batch_size, momentum=ecfg.momentum,
            weight_decay=ecfg.weight_decay)
      params = trainers[epochs, batch_size](init, images, labels, lr,
                                            jax.random.fold_in(ctx.rng, 4))
      params = jax.device_get(params)
      save_models(model_dir(ctx, label, name), params)
      acc, acc_w = ctx.accuracy_and_acc_w(params, net.apply)
      entry = {"acc": evaluate_lib.summarize(acc), "acc_w": evaluate_lib.summarize(acc_w),
               "lr": lr, "epochs": epochs, "num_images": int(len(labels)),
               "seconds": time.time() - start}
      summary[label][name] = entry
      write_json(ctx.workdir / "evaluation.json", summary)
      log(f"[evaluate] {label} on {name}: Acc {fmt_pct(entry['acc'])} "
          f"Acc_W {fmt_pct(entry['acc_w'])} ({time.time() - start:.0f} s)")
  return summary


def stage_verify(ctx: Context) -> dict:
  """Queries every evaluated network with the key's triggers (exact tests)."""
  cfg, ds = ctx.config, ctx.dataset
  wcfg = cfg.watermark
  evaluation = read_json(ctx.workdir / "evaluation.json")
  if not evaluation:
    raise CCDDError(f"no evaluated networks in {ctx.workdir}: run --stage=evaluate first")
  result = {}
  for label, evaluated in evaluation.items():
    net = ctx.network(label)
    predict_all = ctx.predictor(net.apply)
    result[label] = {}
    for name in evaluated:
      params = restore_models(model_dir(ctx, label, name), net, cfg.eval.num_seeds)
      runs = []
      for seed in range(cfg.eval.num_seeds):
        one = jax.tree_util.tree_map(lambda x, s=seed: x[s:s + 1], params)
        predict = lambda u8, p=one: predict_all(p, ctx.normalize(u8))[0]
        runs.append(watermark.verify(
            predict, ctx.key, ds.test_images, ds.test_labels, n_patterns=wcfg.n_patterns,
            patch_size=ctx.patch_size, num_classes=ds.num_classes,
            m=wcfg.queries_per_pattern, alpha=wcfg.alpha, rng=ctx.np_rng(5, seed)))
      result[label][name] = {
          "p_values": [r["p_conditional"] for r in runs],
          "p_values_majority": [r["p_majority"] for r in runs],
          "verified": [r["verified"] for r in runs],
          "runs": runs,
      }
      log(f"[verify] {label} on {name}: verified "
          f"{sum(result[label][name]['verified'])}/{len(runs)} (median p = "
          f"{np.median(result[label][name]['p_values']):.3g}, alpha = {wcfg.alpha:g})")
  write_json(ctx.workdir / "verification.json", result)
  return result


# ----------------------------------------------------------------------------
# Reports and I/O at the edges.
# ----------------------------------------------------------------------------


def fmt_pct(stat: dict) -> str:
  return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}%"


def write_json(path: pathlib.Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2, default=float) + "\n")


def read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    return {}
  return json.loads(path.read_text())


def progress_printer(name: str, total: int):
  """A callback that shows distillation progress with tqdm."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=total, desc=f"[distill] {name}", file=sys.stderr,
                  mininterval=2.0, leave=False)

  def progress(it, loss):
    bar.update(1)
    if it % 25 == 0 or it == total - 1:
      bar.set_postfix(loss=f"{float(loss):.3f}")
    if it == total - 1:
      bar.close()
  return progress


def save_models(path: pathlib.Path, stacked_params: Any) -> None:
  """Saves stacked evaluation networks as one Orbax checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  if path.exists():
    shutil.rmtree(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path.absolute(), stacked_params)
  ckptr.wait_until_finished()
  ckptr.close()


def restore_models(path: pathlib.Path, net: Network, num_seeds: int) -> Any:
  """Restores stacked evaluation networks of `net` saved by `save_models`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not path.is_dir():
    raise CCDDError(f"no evaluated networks at {path}: run --stage=evaluate first")
  like = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct((num_seeds,) + s.shape, s.dtype), net.like_params())
  ckptr = ocp.StandardCheckpointer()
  try:
    return jax.tree_util.tree_map(np.asarray, ckptr.restore(path.absolute(), like))
  finally:
    ckptr.close()


def save_grid(path: pathlib.Path, pixels: np.ndarray, labels: np.ndarray,
              ds: data_lib.Dataset, from_trigger: np.ndarray, title: str) -> None:
  """A PNG grid of [0, 1] pixels, one row per class; slots seeded from D_W framed in red."""
  # The Figure API, not pyplot: the two distilled sets may be saved from two threads.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  classes = sorted(set(int(l) for l in labels))
  per_class = max(int(np.sum(labels == c)) for c in classes)
  fig = Figure(figsize=(0.8 * per_class + 0.6, 0.8 * len(classes) + 0.5))
  axes = fig.subplots(len(classes), per_class, squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for row, c in enumerate(classes):
    for col, i in enumerate(np.flatnonzero(labels == c)):
      ax = axes[row, col]
      img = pixels[i]
      ax.imshow(img[..., 0] if img.shape[-1] == 1 else img,
                cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1,
                interpolation="nearest")
      if from_trigger[i]:
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
          spine.set_edgecolor("red")
          spine.set_linewidth(2)
    axes[row, 0].set_title(ds.class_names[c], fontsize=7, loc="left")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def write_report(ctx: Context, timings: dict) -> dict:
  """Writes report.json and report.md from the stages' outputs."""
  cfg, ds = ctx.config, ctx.dataset
  evaluation = read_json(ctx.workdir / "evaluation.json")
  verification = read_json(ctx.workdir / "verification.json")
  report = {
      "dataset": ds.name, "num_classes": ds.num_classes, "ipc": cfg.distill.ipc,
      "n_patterns": cfg.watermark.n_patterns, "patch_size": ctx.patch_size,
      "alpha": cfg.watermark.alpha, "queries_per_pattern": cfg.watermark.queries_per_pattern,
      "key_fingerprint": watermark.key_fingerprint(ctx.key),
      "experts": read_json(ctx.workdir / "experts.json"),
      "distill": read_json(ctx.workdir / "distill.json"),
      "wall_seconds": timings,
      "jax_version": jax.__version__, "backend": jax.default_backend(),
      "config": cfg.to_dict(),
  }
  architectures = {}
  for label, evaluated in evaluation.items():
    architectures[label] = {}
    for name, entry in evaluated.items():
      entry = dict(entry)
      v = verification.get(label, {}).get(name, {})
      entry.update({k: v[k] for k in ("p_values", "p_values_majority", "verified") if k in v})
      architectures[label][name] = entry
  report["architectures"] = architectures
  for name in SETS:  # The distillation model's results, at the top level.
    report[name] = architectures.get(cfg.model.name, {}).get(name, {})
  write_json(ctx.workdir / "report.json", report)
  (ctx.workdir / "report.md").write_text(report_markdown(report))
  return report


def report_markdown(report: dict) -> str:
  """The short human-readable table of report.json."""
  lines = [f"# CCDD run: {report['dataset']}, IPC {report['ipc']}, "
           f"n = {report['n_patterns']} patterns, alpha = {report['alpha']:g}", "",
           "| model | set | Acc | Acc_W | verified | median p (conditional) | "
           "median p (majority) |",
           "|---|---|---|---|---|---|---|"]
  for label, evaluated in report.get("architectures", {}).items():
    for name in SETS:
      e = evaluated.get(name, {})
      if "acc" not in e:
        continue
      ver = e.get("verified", [])
      p = e.get("p_values", [])
      pm = e.get("p_values_majority", [])
      lines.append(
          f"| {label} | {name} | {fmt_pct(e['acc'])} | {fmt_pct(e['acc_w'])} | "
          f"{sum(ver)}/{len(ver)} | {np.median(p) if p else float('nan'):.3g} | "
          f"{np.median(pm) if pm else float('nan'):.3g} |")
  experts = report.get("experts", {})
  if experts:
    lines += ["", "| experts | Acc | Acc_W |", "|---|---|---|"]
    for kind in experts_lib.KINDS:
      if kind in experts:
        lines.append(f"| {kind} | {fmt_pct(experts[kind]['acc'])} | "
                     f"{fmt_pct(experts[kind]['acc_w'])} |")
  lines += ["", "Wall time (s): " + ", ".join(
      f"{k} {v:.0f}" for k, v in report["wall_seconds"].items()), ""]
  return "\n".join(lines)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks settings that would otherwise fail late (after hours of expert training)."""
  def require(ok: bool, message: str):
    if not ok:
      raise CCDDError(f"invalid config: {message}")
  d, e, w, v = config.distill, config.experts, config.watermark, config.eval
  require(d.ipc >= 1, f"distill.ipc = {d.ipc} must be >= 1")
  require(d.iterations >= 1 and d.syn_steps >= 1, "distill.iterations and syn_steps must be >= 1")
  require(d.max_start_epoch + d.expert_epochs <= e.epochs,
          f"distill.max_start_epoch + distill.expert_epochs = "
          f"{d.max_start_epoch + d.expert_epochs} exceeds experts.epochs = {e.epochs}")
  require(e.num_experts >= 1 and e.epochs >= 1, "experts.num_experts and epochs must be >= 1")
  require(e.group_size >= 0, f"experts.group_size = {e.group_size} must be >= 0 (0 = all)")
  require(config.concurrency >= 0, f"concurrency = {config.concurrency} must be >= 0 (0 = auto)")
  require(w.n_patterns >= 1, f"watermark.n_patterns = {w.n_patterns} must be >= 1")
  require(0.0 < w.ratio <= 1.0, f"watermark.ratio = {w.ratio} must be in (0, 1]")
  require(0.0 < w.alpha < 1.0, f"watermark.alpha = {w.alpha} must be in (0, 1)")
  require(v.num_seeds >= 1 and v.epochs >= 1, "eval.num_seeds and eval.epochs must be >= 1")
  require(min(d.beta, e.lambda1, e.lambda2, e.lambda3) >= 0.0,
          "distill.beta and experts.lambda1..3 must be >= 0")
  require(config.data.zca_eps > 0.0, f"data.zca_eps = {config.data.zca_eps} must be > 0")
  require(d.remat in inner_loop.REMAT_POLICIES,
          f"distill.remat = {d.remat!r}: use one of {', '.join(inner_loop.REMAT_POLICIES)}")
  inner_loop.resolve_unroll(d.unroll, d.syn_steps)  # Raises on a bad distill.unroll.
  models.resolve_conv_impl(config.model.conv_impl)  # Raises on a bad model.conv_impl.
  eval_architectures(config)  # Raises on a bad eval.models list.


def run(config: ml_collections.ConfigDict, workdir: str, stage: str = "all",
        key_file: str | None = None) -> dict:
  """Runs one stage or all of them; returns the report (or the stage's summary)."""
  if stage != "all" and stage not in STAGES:
    raise CCDDError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)} or all")
  validate_config(config)
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise CCDDError(f"cannot create workdir {workdir}: {e.strerror}") from e
  if not os.access(workdir, os.W_OK):
    raise CCDDError(f"workdir {workdir} is not writable")
  key_path = pathlib.Path(key_file) if key_file else workdir / "owner.key"
  if stage not in ("all", "keygen") and not key_path.exists():
    raise CCDDError(f"no key file at {key_path}: run --stage=keygen first or pass --key_file")
  ctx = Context(config, workdir, key_path)
  timings = read_json(workdir / "timings.json")
  functions = {"keygen": stage_keygen, "experts": stage_experts, "distill": stage_distill,
               "evaluate": stage_evaluate, "verify": stage_verify}
  result = {}
  for name in (STAGES if stage == "all" else (stage,)):
    start = time.time()
    result = functions[name](ctx)
    timings[name] = time.time() - start
    write_json(workdir / "timings.json", timings)
  if stage in ("all", "verify"):
    timings["total"] = sum(timings.get(s, 0.0) for s in STAGES)
    return write_report(ctx, timings)
  return result
