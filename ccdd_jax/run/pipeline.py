"""The stages of the method, run from a config into a workdir (layout: workdir.py).

  keygen    -> owner.key (or --key_file), mode 0600; owner.commitment (public)
  queries   -> queries.npz: stamped held-out images for a black-box suspect (blackbox.py)
  experts   -> trajectories/{clean,watermarked,fp_enhanced}/NNNN (Orbax), experts.json
  distill   -> distilled.npz, clean_distilled.npz, distilled.png, clean_distilled.png
  evaluate  -> models/<architecture>/<set> (Orbax), evaluation.json
  verify    -> verification.json, report.json, report.md (--predictions: verification_blackbox.json)
  attacks   -> attacks.json, attacks.png, attacks_data.png, report.md's tables (not in all)

Each stage reads only what earlier stages wrote; a rerun resumes (resume.py, manifest.py).
Orchestration only: the method lives in experts, distill, evaluate, watermark, threats
and data_threats; I/O in checkpoints, workdir and reporting.
"""

import pathlib
import time

import jax
import ml_collections
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.config import validation
from ccdd_jax.devices import parallel
from ccdd_jax.devices import sharding
from ccdd_jax.log import log
from ccdd_jax.method import distill as distill_lib
from ccdd_jax.method import embedding
from ccdd_jax.method import evaluate as evaluate_lib
from ccdd_jax.method import experts as experts_lib
from ccdd_jax.method import models
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.run import blackbox
from ccdd_jax.run import checkpoints
from ccdd_jax.run import context
from ccdd_jax.run import manifest
from ccdd_jax.run import reporting
from ccdd_jax.run import resume
from ccdd_jax.run import workdir as workdir_lib
from ccdd_jax.threats import data_suite
from ccdd_jax.threats import suite

STAGES = ("keygen", "queries", "experts", "distill", "evaluate", "verify", "attacks")
ALL_STAGES = STAGES[:6]  # --stage=all: keygen..verify; attacks run only when asked.
SETS = reporting.SETS
Context = context.Context


def stage_keygen(ctx: Context) -> dict:
  """Writes a fresh 32-byte key with mode 0600, unless the key file exists; and its commitment."""
  if ctx.key_file.exists():
    watermark.read_key_file(ctx.key_file)  # Validates it.
    log(f"[keygen] using the existing key file {ctx.key_file}")
  else:
    blackbox.refuse_orphan_commitment(ctx.workdir)
    watermark.write_key_file(ctx.key_file, watermark.generate_key())
    log(f"[keygen] wrote a new key to {ctx.key_file} (mode 0600; keep it secret)")
  blackbox.keep_commitment(ctx.workdir, ctx.key_file)
  return {"key_fingerprint": watermark.key_fingerprint(ctx.key)}


def stage_queries(ctx: Context) -> dict:
  """Writes queries.npz: held-out images stamped by the key, shuffled (blackbox.py)."""
  ds, m = ctx.dataset, ctx.config.watermark.queries_per_pattern
  return blackbox.write_queries(ctx.workdir, ctx.key, ds.test_images, ctx.patterns()[0], m)


def stage_experts(ctx: Context) -> dict:
  """Trains clean, watermarked and fine-pruning-enhanced experts; saves trajectories (resumes)."""
  cfg, num, e = ctx.config, len(ctx.dataset.train_labels), ctx.config.experts
  rng_init, rng_train = jax.random.split(jax.random.fold_in(ctx.rng, 1))
  init = ctx.net.init_params(rng_init, e.num_experts)
  inputs, num_wm = ctx.expert_inputs, len(ctx.watermark_set[1])
  args = (ctx.fingerprint("experts"), ctx.net.like_params(), e.num_experts, e.epochs)
  store = resume.ExpertStore(ctx.workdir, *args, ctx.accuracy_and_acc_w)
  if done := store.describe(e.num_experts):
    log(f"[experts] resuming: {done}")
  log(
    f"[experts] {e.num_experts} experts per kind x {e.epochs} epochs "
    f"({', '.join(embedding.expert_kinds(cfg.distill))}) "
    f"(|D_C| = {num}, |D_W| = {num_wm}) ..."
  )
  start, progress = time.time(), reporting.group_progress("experts")
  args = (init, rng_train, inputs, store, cfg.concurrency, progress, ctx.mesh)
  kinds = embedding.expert_kinds(cfg.distill)  # Clean only for the "appended" embedding.
  experts_lib.train_kinds_resumable(e, ctx.net.apply, cfg.dsa, *args, kinds=kinds)
  summary = {"d_w_size": num_wm, "d_c_size": num, "seconds": time.time() - start}
  for kind in kinds:
    acc, acc_w = store.metrics(kind)
    summary[kind] = {"acc": evaluate_lib.summarize(acc), "acc_w": evaluate_lib.summarize(acc_w)}
    log(f"[experts] {kind}: Acc {100 * np.mean(acc):.1f}% Acc_W {100 * np.mean(acc_w):.1f}%")
  reporting.write_json(ctx.workdir / "experts.json", summary)
  return summary


def stage_distill(ctx: Context) -> dict:
  """Distils the watermarked set (eq. 9, 10) and, for comparison, a clean one; with the
  "appended" embedding the watermarked set is the clean one plus stamped carriers."""
  cfg, ds = ctx.config, ctx.dataset
  epochs = cfg.distill.max_start_epoch + cfg.distill.expert_epochs + 1
  root, like = workdir_lib.trajectories_dir(ctx.workdir), ctx.net.like_params()
  patterns, pattern_labels = ctx.patterns()
  resume_dir, _ = resume.stage_dir(ctx.workdir, "distill", ctx.fingerprint("distill"))
  before = resume.sets_digest(ctx.workdir)

  def distill_set(name, kind, twin_kind):
    start, set_cfg = time.time(), embedding.set_config(cfg.distill, kind != "clean")
    store, expert = resume.DistillStore(resume_dir / name), loaded[kind]
    trajs = (expert, loaded[twin_kind] if set_cfg.beta else expert)
    trajs += (loaded["clean"],) if set_cfg.clean_expert_fraction else ()
    pool = (ds.train_images, ds.train_labels, ds.num_classes, patterns, pattern_labels)
    init_u8, labels, from_trigger = embedding.initial_set(
      set_cfg, *pool, ctx.np_rng(3), ctx.np_rng(6)
    )
    aux = embedding.aux_inputs(set_cfg, from_trigger, ctx.patch_size, ctx.expert_inputs)
    log(
      f"[distill] {name}: {len(labels)} images from {expert.shape[0]} {kind} experts, "
      f"{set_cfg.iterations} iterations x {set_cfg.syn_steps} steps"
      + (f", resuming at iteration {store.latest()}" if store.latest() else "")
    )
    progress = reporting.progress_printer(name, set_cfg.iterations)
    init_images = ctx.preprocess.apply(init_u8)
    init_logits = embedding.initial_label_logits(
      set_cfg,
      labels,
      ds.num_classes,
      lambda: ctx.net.apply_flat(expert[0, -1], init_images),  # Epoch t_max + M (DATM).
    )
    images, lr, losses, label_logits = distill_lib.distill(
      set_cfg,
      ctx.net.apply_flat,
      cfg.dsa,
      init_images,
      labels,
      trajs,
      jax.random.fold_in(ctx.rng, 2),
      progress,
      aux,
      store,
      ctx.mesh,
      label_logits=init_logits,
    )
    return save_set(name, set_cfg, images, labels, lr, from_trigger, losses, start, label_logits)

  def save_set(name, set_cfg, images, labels, lr, from_trigger, losses, start, logits=None):
    workdir_lib.save_distilled(
      ctx.workdir, name, images, labels, lr, from_trigger, losses, ctx.preprocess, logits
    )
    pixels = ctx.preprocess.to_pixels(images)
    title = f"{name} ({ds.name}, IPC {set_cfg.ipc}, {len(labels)} images)"
    reporting.save_grid(
      ctx.workdir / f"{name}.png", pixels, labels, ds.class_names, from_trigger, title
    )
    visibility = watermark.trigger_visibility(pixels, patterns)
    entry = reporting.distill_summary(losses, lr, visibility, from_trigger, time.time() - start)
    if logits is not None:
      entry["soft_labels"] = embedding.soft_label_summary(logits, labels)
    log(reporting.distill_line(name, entry))
    return entry

  def append_carriers():  # The "appended" embedding: the clean set plus its carriers.
    start, set_cfg = time.time(), embedding.set_config(cfg.distill, True)
    clean = workdir_lib.load_distilled(ctx.workdir, "clean_distilled")
    pool = (ds.train_images, ds.train_labels, patterns, pattern_labels, ctx.preprocess.apply)
    images, labels, carriers = embedding.appended_set(set_cfg, clean, *pool, ctx.np_rng(6))
    log(f"[distill] distilled: the clean distilled set + {carriers.sum()} stamped carriers")
    args = (images, labels, float(clean["lr"]), carriers, clean["losses"], start)
    return {**save_set("distilled", set_cfg, *args), "embedding": "appended"}

  # The two sets are independent: on CPU they run at once (`concurrency`).
  appended = cfg.distill.watermark_embedding == "appended"
  jobs = [("distilled", "watermarked", "fp_enhanced")] * (not appended)
  jobs += [("clean_distilled", "clean", "clean")]
  load = lambda kind: checkpoints.load_flat_trajectories(root, kind, like, epochs)
  kinds = embedding.expert_kinds(cfg.distill, matched=True)
  loaded = {kind: load(kind) for kind in kinds}  # Up front: a bad checkpoint fails both.
  workers = parallel.resolve_concurrency(cfg.concurrency)
  summary = dict(zip([j[0] for j in jobs], parallel.run_concurrently(distill_set, jobs, workers)))
  if appended:
    summary = {"distilled": append_carriers(), **summary}
  reporting.write_json(ctx.workdir / "distill.json", summary)
  resume.drop_stale(ctx.workdir, before)  # Evaluations of other sets, if they changed.
  return summary


def stage_evaluate(ctx: Context) -> dict:
  """Trains fresh networks of each `eval.models` architecture on each set; Acc / Acc_W.

  The real-data baseline: the distillation model only (all with `eval.real_all_models`).
  Results merge into evaluation.json, so more architectures can be evaluated later.
  """
  cfg, ecfg = ctx.config, ctx.config.eval
  sets = resume.check_distilled(
    ctx.workdir, SETS[:2], ctx.dataset.image_shape, ctx.dataset.num_classes
  )
  sets["real"] = {"images": ctx.train_x, "labels": ctx.dataset.train_labels}
  summary = reporting.read_json(ctx.workdir / "evaluation.json")
  done = resume.evaluated(ctx.workdir, ctx.fingerprint("evaluate"))
  for arch in models.eval_architectures(ecfg.models, cfg.model.name):
    names = SETS if arch == cfg.model.name or ecfg.real_all_models else SETS[:2]
    old, net = summary.get(arch, {}), ctx.network(arch)
    summary[arch] = {n: old[n] for n in names if (arch, n) in done and n in old}
    if summary[arch]:
      log(f"[evaluate] {arch} resuming: {', '.join(summary[arch])} done")
    init, rng = ctx.evaluation_rngs(net, ecfg.num_seeds)
    announce = lambda text, a=arch: log(f"[evaluate] {a} {text}")
    for name, params, entry in evaluate_lib.train_on_sets(
      net.apply,
      cfg.dsa,
      ecfg,
      init,
      {n: sets[n] for n in names if n not in summary[arch]},
      rng,
      on_start=announce,
      mesh=ctx.mesh,
    ):
      checkpoints.save_networks(workdir_lib.networks_dir(ctx.workdir, arch, name), params)
      acc, acc_w = ctx.accuracy_and_acc_w(params, net)
      entry.update(acc=evaluate_lib.summarize(acc), acc_w=evaluate_lib.summarize(acc_w))
      summary[arch][name] = entry
      reporting.write_json(ctx.workdir / "evaluation.json", summary)
      done.add((arch, name))
      resume.mark_evaluated(ctx.workdir, done)
      log(
        f"[evaluate] {arch} on {name}: Acc {reporting.fmt_pct(entry['acc'])} "
        f"Acc_W {reporting.fmt_pct(entry['acc_w'])} ({entry['seconds']:.0f} s)"
      )
  return summary


def stage_verify(ctx: Context, predictions: str | None = None) -> dict:
  """Queries each evaluated network with the key's triggers (exact tests); or a file's answers."""
  cfg, ds, wcfg = ctx.config, ctx.dataset, ctx.config.watermark
  if predictions:
    return blackbox.verify_file(ctx.workdir, predictions, ctx.key, ds, ctx.patterns(), wcfg)
  evaluation, result = resume.read_json_checked(ctx.workdir / "evaluation.json"), {}
  for arch, evaluated in evaluation.items():
    net, result[arch] = ctx.network(arch), {}
    for name in evaluated:
      result[arch][name] = r = verify.verify_networks(
        ctx.predictor(net.apply),
        ctx.restore_networks(name, arch),
        ctx.preprocess.apply,
        ctx.key,
        ds.test_images,
        ds.test_labels,
        [ctx.np_rng(5, seed) for seed in range(cfg.eval.num_seeds)],
        n_patterns=wcfg.n_patterns,
        patch_size=ctx.patch_size,
        num_classes=ds.num_classes,
        m=wcfg.queries_per_pattern,
        alpha=wcfg.alpha,
      )
      log(
        f"[verify] {arch} on {name}: verified {sum(r['verified'])}/{len(r['verified'])} "
        f"(median p = {np.median(r['p_values']):.3g}, alpha = {wcfg.alpha:g})"
      )
  reporting.write_json(ctx.workdir / "verification.json", result)
  return result


def stage_attacks(ctx: Context) -> dict:
  """Attacks each set's networks (threats) and the distilled data (data_threats); verifies each."""
  networks = {n: ctx.restore_networks(n) for n in suite.parse_list(ctx.config.attacks.sets)}
  args = (ctx.net, ctx.verifier(), networks, ctx.attacker_data, ctx.np_rng(11))
  result = suite.run_suite(ctx.config, *args)
  if ctx.config.attacks.data_threats:
    result["data"] = data_suite.run(ctx.config, **ctx.data_threats_inputs())
  reporting.write_attacks(ctx.workdir, result)
  return result


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  stage: str = "all",
  key_file: str | None = None,
  predictions: str | None = None,
  commitment: str | None = None,
  fresh: bool = False,
) -> dict:
  """Runs one stage or all of them; returns the report (or the stage's summary). Flags: main.py.

  A rerun resumes; `fresh` first clears the workdir's outputs (not the key).
  A config that changes what the stage would reuse is refused (manifest.py).
  """
  if stage != "all" and stage not in STAGES:
    raise CCDDError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)} or all")
  validation.validate(config)
  workdir = workdir_lib.prepare(workdir)
  if fresh and (removed := workdir_lib.clear_outputs(workdir)):
    log(f"--fresh: removed {', '.join(removed)} from {workdir}")
  key_path = pathlib.Path(key_file) if key_file else workdir / "owner.key"
  if (stage not in ("all", "keygen") or sharding.multi_process()) and not key_path.exists():
    raise CCDDError(f"no key file at {key_path}: run --stage=keygen first or pass --key_file")
  blackbox.check_commitment(commitment, key_path)
  ctx = Context(config, workdir, key_path)
  manifest.check(workdir, ctx.fields(), stage)
  if not predictions:
    ctx.check_inputs(stage)
  timings = reporting.read_json(workdir / "timings.json")
  functions = {
    "keygen": stage_keygen,
    "queries": stage_queries,
    "experts": stage_experts,
    "distill": stage_distill,
    "evaluate": stage_evaluate,
    "verify": lambda c: stage_verify(c, predictions),
    "attacks": stage_attacks,
  }
  result = {}
  for name in ALL_STAGES if stage == "all" else (stage,):
    start = time.time()
    if name != "keygen":  # After the checks; the key exists from here on.
      manifest.write(workdir, ctx.fields())
    result = functions[name](ctx)
    sharding.barrier(f"ccdd stage {name}")  # Process 0's files are written (sharding.is_writer).
    timings[name] = time.time() - start
    reporting.write_json(workdir / "timings.json", timings)
  if stage not in ("all", "verify", "attacks") or predictions:
    return result
  timings["total"] = sum(timings.get(s, 0.0) for s in STAGES)
  report = reporting.build_report(workdir, ctx.report_header(timings), config.model.name)
  reporting.write_report(workdir, report)
  return report
