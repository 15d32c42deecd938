"""The stages of the method, run from a config into a workdir: orchestration only.

stages.py's table declares each stage (what it reads, writes and owns);
`stage_<name>(ctx)` here runs it by calling the method (method/), the
threats (threats/) and the workdir's files (workdir, checkpoints, sets,
reporting); `run` checks everything up front, then runs the stages asked for.
Each stage reads only what earlier stages wrote; a rerun resumes (resume.py,
manifest.py). The workdir's layout: workdir.py.
"""

import pathlib
import time

import jax
import ml_collections
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax import Preempted
from ccdd_jax import lists
from ccdd_jax import streams
from ccdd_jax.config import validation
from ccdd_jax.devices import parallel
from ccdd_jax.devices import sharding
from ccdd_jax.log import log
from ccdd_jax.method import embedding
from ccdd_jax.method import evaluate
from ccdd_jax.method import experts
from ccdd_jax.method import models
from ccdd_jax.method import trajectory_pairs
from ccdd_jax.method import watermark
from ccdd_jax.run import attack_plots
from ccdd_jax.run import blackbox
from ccdd_jax.run import checkpoints
from ccdd_jax.run import context
from ccdd_jax.run import lock as run_lock
from ccdd_jax.run import manifest
from ccdd_jax.run import preemption
from ccdd_jax.run import reporting
from ccdd_jax.run import resume
from ccdd_jax.run import sets
from ccdd_jax.run import stages
from ccdd_jax.run import tensorboard
from ccdd_jax.run import trajectory_store
from ccdd_jax.run import workdir as workdir_lib
from ccdd_jax.threats import data_suite
from ccdd_jax.threats import suite

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
  """Writes queries.npz: held-out images stamped by the key, or key-derived ones, shuffled."""
  wcfg = ctx.config.watermark
  return blackbox.write_queries(ctx.workdir, ctx.key, ctx.dataset, ctx.patterns()[0], wcfg)


def stage_experts(ctx: Context) -> dict:
  """Trains clean, watermarked and fine-pruning-enhanced experts; saves trajectories (resumes)."""
  cfg, num, e = ctx.config, len(ctx.dataset.train_labels), ctx.config.experts
  rng_init, rng_train = jax.random.split(ctx.jax_key(streams.EXPERTS))
  init = ctx.net.init_params(rng_init, e.num_experts)
  inputs, num_wm = ctx.expert_inputs, len(ctx.watermark_set[1])
  args = (ctx.fingerprint("experts"), ctx.net.like_params(), e.num_experts, e.epochs)
  store = resume.ExpertStore(ctx.workdir, *args, ctx.accuracy_and_acc_w)
  store = tensorboard.watch_experts(store, ctx.workdir, ctx.accuracy_and_acc_w, e.tensorboard_every)
  if done := store.describe(e.num_experts):
    log(f"[experts] resuming: {done}")
  kinds = embedding.expert_kinds(cfg.distill)  # Clean only for the "appended" embedding.
  log(
    f"[experts] {e.num_experts} experts per kind x {e.epochs} epochs ({', '.join(kinds)}) "
    f"(|D_C| = {num}, |D_W| = {num_wm}) ..."
  )
  start, progress = time.time(), reporting.group_progress("experts")
  args = (init, rng_train, inputs, store, cfg.concurrency, progress, ctx.mesh)
  stop = preemption.should_stop
  experts.train_kinds_resumable(e, ctx.net.apply, cfg.dsa, *args, kinds=kinds, should_stop=stop)
  summary = {"d_w_size": num_wm, "d_c_size": num, "seconds": time.time() - start}
  for kind in kinds:
    acc, acc_w = store.metrics(kind)
    summary[kind] = {"acc": evaluate.summarize(acc), "acc_w": evaluate.summarize(acc_w)}
    log(f"[experts] {kind}: Acc {100 * np.mean(acc):.1f}% Acc_W {100 * np.mean(acc_w):.1f}%")
  reporting.write_json(ctx.workdir / "experts.json", summary)
  return summary


def stage_distill(ctx: Context) -> dict:
  """Distils the watermarked set (eq. 9, 10) and, for comparison, a clean one; with the
  "appended" embedding the watermarked set is the clean one plus stamped carriers, with
  "clean_label" the clean one crafted within a pixel budget."""
  cfg = ctx.config
  root, like = workdir_lib.trajectories_dir(ctx.workdir), ctx.net.like_params()
  epochs = trajectory_pairs.trajectory_epochs(cfg.distill)
  kinds = embedding.expert_kinds(cfg.distill, matched=True)
  # Loaded up front: a bad checkpoint fails before either set starts.
  loaded = trajectory_store.load(root, kinds, like, epochs, cfg.distill.trajectory_store)
  resume_dir, _ = resume.stage_dir(ctx.workdir, "distill", ctx.fingerprint("distill"))
  before = resume.sets_digest(ctx.workdir)
  from_clean = cfg.distill.watermark_embedding in embedding.FROM_CLEAN_SET
  jobs = [("distilled", ("watermarked", "fp_enhanced"))] * (not from_clean)
  jobs += [("clean_distilled", ("clean", "clean"))]
  # The two sets are independent: on CPU they run at once (`concurrency`).
  results = parallel.run_concurrently(
    lambda name, pair: sets.distill_set(ctx, name, pair, loaded, resume_dir),
    jobs,
    parallel.resolve_concurrency(cfg.concurrency),
  )
  summary = dict(zip([name for name, _ in jobs], results))
  if cfg.distill.watermark_embedding == "appended":
    summary = {"distilled": sets.append_carriers(ctx), **summary}
  elif from_clean:
    summary = {"distilled": sets.craft_set(ctx, resume_dir), **summary}
  reporting.write_json(ctx.workdir / "distill.json", summary)
  resume.drop_stale(ctx.workdir, before)  # Evaluations of other sets, if they changed.
  return summary


def stage_evaluate(ctx: Context) -> dict:
  """Trains fresh networks of each `eval.models` architecture on each set; Acc / Acc_W.

  The real-data baseline: the distillation model only (all with `eval.real_all_models`).
  Results merge into evaluation.json, so more architectures can be evaluated later.
  """
  cfg, ecfg, ds = ctx.config, ctx.config.eval, ctx.dataset
  data = resume.check_distilled(
    ctx.workdir, evaluate.DISTILLED_SETS, ds.image_shape, ds.num_classes
  )
  data["real"] = {"images": ctx.train_x, "labels": ds.train_labels}
  summary = reporting.read_json(ctx.workdir / "evaluation.json")
  done = resume.evaluated(ctx.workdir, ctx.fingerprint("evaluate"))
  archs = models.eval_architectures(ecfg.models, cfg.model.name)
  for arch in archs:
    primary = arch == cfg.model.name or ecfg.real_all_models
    names = evaluate.SETS if primary else evaluate.DISTILLED_SETS
    old, net = summary.get(arch, {}), ctx.network(arch)
    summary[arch] = {n: old[n] for n in names if (arch, n) in done and n in old}
    if summary[arch]:
      log(f"[evaluate] {arch} resuming: {', '.join(summary[arch])} done")
    init, rng = ctx.evaluation_rngs(net, ecfg.num_seeds)
    announce = lambda text, a=arch: log(f"[evaluate] {a} {text}")
    todo = {n: data[n] for n in names if n not in summary[arch]}
    for name, params, entry in evaluate.train_on_sets(
      net.apply, cfg.dsa, ecfg, init, todo, rng, on_start=announce, mesh=ctx.mesh
    ):
      checkpoints.save_networks(workdir_lib.networks_dir(ctx.workdir, arch, name), params)
      acc, acc_w = ctx.accuracy_and_acc_w(params, net)
      entry.update(acc=evaluate.summarize(acc), acc_w=evaluate.summarize(acc_w))
      summary[arch][name] = entry
      reporting.write_json(ctx.workdir / "evaluation.json", summary)
      done.add((arch, name))
      resume.mark_evaluated(ctx.workdir, done)
      log(
        f"[evaluate] {arch} on {name}: Acc {reporting.fmt_pct(entry['acc'])} "
        f"Acc_W {reporting.fmt_pct(entry['acc_w'])} ({entry['seconds']:.0f} s)"
      )
      if (arch, name) != (archs[-1], list(todo)[-1]) and preemption.should_stop():
        raise Preempted(f"after {arch} on {name}")  # Written: it resumes with the next one.
  return summary


def stage_verify(ctx: Context) -> dict:
  """Queries each evaluated network with the key's triggers: the exact tests (verify.py)."""
  alpha, result = ctx.config.watermark.alpha, {}
  evaluation = reporting.read_json(ctx.workdir / "evaluation.json")
  for arch, evaluated in evaluation.items():
    verifier, result[arch] = ctx.verifier(ctx.network(arch)), {}
    for name in evaluated:
      result[arch][name] = r = verifier.verify_networks(ctx.restore_networks(name, arch))
      log(
        f"[verify] {arch} on {name}: verified {sum(r['verified'])}/{len(r['verified'])} "
        f"(median p = {np.median(r['p_values']):.3g}, alpha = {alpha:g})"
      )
  reporting.write_json(ctx.workdir / "verification.json", result)
  return result


def verify_predictions(ctx: Context, predictions: str) -> dict:
  """--stage=verify --predictions: tests a black-box suspect's answers to queries.npz."""
  wcfg = ctx.config.watermark
  return blackbox.verify_file(ctx.workdir, predictions, ctx.key, ctx.dataset, ctx.patterns(), wcfg)


def stage_attacks(ctx: Context) -> dict:
  """Attacks each set's networks (threats.suite) and the distilled data (threats.data_suite)."""
  networks = {n: ctx.restore_networks(n) for n in lists.parse_list(ctx.config.attacks.sets)}
  args = (ctx.net, ctx.verifier(), networks, ctx.attacker_data)
  result = suite.run_suite(ctx.config, *args, ctx.np_rng(streams.MODEL_ATTACKS))
  if ctx.config.attacks.data_threats:
    result["data"] = data_suite.run(ctx.config, **ctx.data_threats_inputs())
  attack_plots.write_attacks(ctx.workdir, result)
  return result


@preemption.handled  # SIGTERM / SIGINT: the stage stops at its next step, its state saved.
@run_lock.released_at_return
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
  if stage != "all" and stage not in stages.NAMES:
    raise CCDDError(f"unknown stage {stage!r}: use one of {', '.join(stages.NAMES)} or all")
  if predictions and stage != "verify":
    raise CCDDError("--predictions goes with --stage=verify")
  validation.validate(config)
  key_path = pathlib.Path(key_file) if key_file else pathlib.Path(workdir) / "owner.key"
  # Several processes: each must read the same key, with the same flags; before any write.
  facts = {"configs": config.to_json_best_effort(sort_keys=True), "stages": stage}
  sharding.check_same_run(key_path, **facts, **{"--fresh flags": str(fresh)})
  workdir = workdir_lib.prepare(workdir)
  run_lock.hold(workdir, stage)  # One run per workdir (run.lock) from here; before any write.
  if fresh and sharding.is_writer() and (removed := workdir_lib.clear_outputs(workdir)):
    log(f"--fresh: removed {', '.join(removed)} from {workdir}")
  sharding.barrier("ccdd start")  # The others read the workdir once process 0 made and cleared it.
  if (stage not in ("all", "keygen") or sharding.multi_process()) and not key_path.exists():
    raise CCDDError(f"no key file at {key_path}: run --stage=keygen first or pass --key_file")
  blackbox.check_commitment(commitment, key_path)
  ctx = Context(config, workdir, key_path)
  manifest.check(workdir, ctx.fields(), stage)
  names = stages.IN_ALL if stage == "all" else (stage,)
  if not predictions and stage != "all":
    ctx.check_inputs(stages.get(stage).reads)
  timings, result = reporting.read_json(workdir / "timings.json"), {}
  for name in names:
    start = time.time()
    if name != "keygen":  # After the checks; the key exists from here on.
      manifest.write(workdir, ctx.fields())
    function = globals()[f"stage_{name}"]  # Every row of stages.TABLE has one.
    with preemption.stage(name):
      result = verify_predictions(ctx, predictions) if predictions else function(ctx)
    tensorboard.stage_done(workdir, name, None if predictions else result)
    sharding.barrier(f"ccdd stage {name}")  # Process 0's files are written (sharding.is_writer).
    timings[name] = time.time() - start
    reporting.write_json(workdir / "timings.json", timings)
    if name != names[-1]:
      preemption.between_stages(name)
  if stage not in ("all", "verify", "attacks") or predictions:
    return result
  timings["total"] = sum(timings.get(s, 0.0) for s in stages.NAMES)
  report = reporting.build_report(workdir, ctx.report_header(timings), config.model.name)
  reporting.write_report(workdir, report)
  return report
