"""What every stage derives from a config: data, networks, preprocessing, watermark patterns.

A `Context` is built once per run (`pipeline.run`) and handed to each stage;
it holds only what the config determines, never a stage's results. Its random
streams are those of streams.py.
"""

from collections.abc import Callable
import functools
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax import lists
from ccdd_jax import streams
from ccdd_jax.data import datasets
from ccdd_jax.data import preprocess
from ccdd_jax.devices import sharding
from ccdd_jax.method import embedding
from ccdd_jax.method import evaluate
from ccdd_jax.method import exact_tests
from ccdd_jax.method import models
from ccdd_jax.method import trajectory_pairs
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.run import checkpoints
from ccdd_jax.run import manifest
from ccdd_jax.run import reporting
from ccdd_jax.run import resume
from ccdd_jax.run import workdir as workdir_lib


class Context:
  """What every stage derives from the config: data, networks, watermark patterns."""

  def __init__(
    self, config: ml_collections.ConfigDict, workdir: pathlib.Path, key_file: pathlib.Path
  ):
    self.config, self.workdir, self.key_file = config, pathlib.Path(workdir), pathlib.Path(key_file)
    # The devices the stages spread over (config.num_devices; sharding.py).
    self.mesh = sharding.resolve_mesh(config.get("num_devices", 0))
    self.dataset = ds = datasets.load_dataset(config.data)
    self.net = models.build_network(config.model.name, ds.num_classes, ds.image_shape, config.model)
    self.patch_size = config.watermark.patch_size or ds.image_shape[0] // 2  # Paper, Stage I.
    if self.patch_size > min(ds.image_shape[:2]):
      raise CCDDError(
        f"invalid config: watermark.patch_size = {self.patch_size} is larger than the "
        f"{ds.image_shape[0]}x{ds.image_shape[1]} images of {ds.name}"
      )
    n, alpha = config.watermark.n_patterns, config.watermark.alpha
    if exact_tests.p_floor(ds.num_classes, n) > alpha:
      fewest = next(k for k in range(1, 1000) if exact_tests.p_floor(ds.num_classes, k) <= alpha)
      raise CCDDError(
        f"invalid config: watermark.n_patterns = {n} with {ds.num_classes} classes can never "
        f"be verified: no p-value falls below {ds.num_classes}^-{n} > alpha = {alpha:g}; "
        f"use n_patterns >= {fewest} (more leaves a margin) or a larger alpha"
      )
    self.preprocess = preprocess.fit_preprocessor(
      ds.train_images,
      zca=config.data.zca,
      zca_eps=config.data.zca_eps,
      cache_dir=config.data.cache_dir,
    )
    self.train_x = self.preprocess.apply(ds.train_images)
    self._predictors, self._verifiers = {}, {}

  def np_rng(self, stream: int, *sub: int) -> np.random.Generator:
    """The numpy generator of one stream of streams.py's table, from the config seed."""
    return streams.numpy_rng(self.config.seed, stream, *sub)

  def jax_key(self, stream: int) -> jax.Array:
    """The JAX key of one stream of streams.py's table, from the config seed."""
    return streams.jax_key(self.config.seed, stream)

  def network(self, arch: str) -> models.Network:
    """The evaluation architecture `arch` (an `eval.models` entry) on this data set."""
    ds, cfg = self.dataset, self.config
    if arch == cfg.model.name:
      return self.net
    return models.build_network(
      arch, ds.num_classes, ds.image_shape, cfg.model, width=cfg.eval.width
    )

  @functools.cached_property
  def key(self) -> bytes:
    """The owner's secret key, read once from the key file."""
    return watermark.read_key_file(self.key_file)

  def report_header(self, timings: dict) -> dict:
    """report.json's run-level fields (reporting.report_header) for this run."""
    ds = self.dataset
    fingerprint = watermark.key_fingerprint(self.key)
    args = (ds.name, ds.num_classes, self.patch_size, fingerprint, timings)
    return reporting.report_header(self.config, *args)

  def fields(self) -> dict:
    """The manifest's fields of this run (the key's fingerprint is None before keygen)."""
    fp = watermark.key_fingerprint(self.key) if self.key_file.exists() else None
    return manifest.record(self.config, fp, self.dataset.num_classes)

  def fingerprint(self, stage: str) -> str:
    """The tag of `stage`'s resume state: the fields its results depend on (manifest.py)."""
    return manifest.fingerprint(self.fields(), stage)

  def check_inputs(self, reads: tuple[str, ...]) -> None:
    """Before any long work: every input a stage reads (stages.Stage.reads) exists and fits."""
    checks = {
      "experts": self._check_experts,
      "distilled_sets": self._check_distilled_sets,
      "evaluated_networks": self._check_evaluated_networks,
      "attacked_networks": self._check_attacked_networks,
    }
    for name in reads:
      checks[name]()

  def _check_experts(self) -> None:
    cfg, root = self.config, workdir_lib.trajectories_dir(self.workdir)
    kinds = embedding.expert_kinds(cfg.distill, matched=True)
    epochs = trajectory_pairs.trajectory_epochs(cfg.distill)
    resume.check_experts(root, kinds, self.net.like_params(), epochs, cfg.experts.num_experts)

  def _check_distilled_sets(self) -> None:
    ds = self.dataset
    resume.check_distilled(self.workdir, evaluate.DISTILLED_SETS, ds.image_shape, ds.num_classes)

  def _evaluated_pairs(self) -> list[tuple[str, str]]:
    evaluation = reporting.read_json(self.workdir / "evaluation.json")
    if not evaluation:
      raise CCDDError(f"no evaluated networks in {self.workdir}: run --stage=evaluate first")
    return [(arch, name) for arch, sets in evaluation.items() for name in sets]

  def _check_evaluated_networks(self) -> None:
    resume.check_networks(self.workdir, self._evaluated_pairs())

  def _check_attacked_networks(self) -> None:
    cfg = self.config
    self._evaluated_pairs()
    names = set(lists.parse_list(cfg.attacks.sets))
    if cfg.attacks.data_threats:  # The data threats read both distilled sets and their networks.
      names |= set(evaluate.DISTILLED_SETS)
      self._check_distilled_sets()
    pairs = [(cfg.model.name, n) for n in evaluate.SETS if n in names]
    resume.check_networks(self.workdir, pairs)

  def patterns(self, key: bytes | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Trigger patterns and labels of `key` (default: the owner's)."""
    return watermark.expand_key(
      key or self.key,
      self.config.watermark.n_patterns,
      self.patch_size,
      self.dataset.image_shape[-1],
      self.dataset.num_classes,
    )

  def predictor(self, apply: Callable) -> Callable[[Any, np.ndarray], np.ndarray]:
    """`evaluate.make_predictor(apply)`, made once per network, so compiled once per shape."""
    if apply not in self._predictors:
      self._predictors[apply] = evaluate.make_predictor(apply)
    return self._predictors[apply]

  @functools.cached_property
  def watermark_set(self) -> tuple[np.ndarray, np.ndarray]:
    """D_W: stamped uint8 training images (`watermark.ratio` of D_C) and their labels y_i."""
    ds, wcfg = self.dataset, self.config.watermark
    images, labels, _ = watermark.make_watermark_set(
      ds.train_images,
      ds.train_labels,
      *self.patterns(),
      wcfg.ratio,
      self.np_rng(streams.WATERMARK_SET),
    )
    return images, labels

  @functools.cached_property
  def expert_inputs(self) -> dict:
    """The experts' device arrays: normalised D_C, D_W and the clean images that rank channels."""
    num = len(self.dataset.train_labels)
    prune_idx = self.np_rng(streams.PRUNE_IMAGES).choice(
      num, min(self.config.experts.prune_examples, num), replace=False
    )
    wm_images, wm_labels = self.watermark_set
    inputs = {
      "train_images": self.train_x,
      "train_labels": self.dataset.train_labels.astype(np.int32),
      "wm_images": self.preprocess.apply(wm_images),
      "wm_labels": wm_labels.astype(np.int32),
      "prune_images": self.train_x[prune_idx],
    }
    if self.config.experts.trigger_safe_dsa:  # The stamped corner bypasses DSA.
      inputs["trigger_corner"] = watermark.corner_mask(self.dataset.image_shape, self.patch_size)
    return jax.tree_util.tree_map(jnp.asarray, inputs)

  def accuracy_and_acc_w(self, stacked_params: Any, net: models.Network | None = None):
    """Per-network test accuracy and Acc_W on all stamped test images (two lists)."""
    return self.verifier(net).accuracy_and_acc_w(stacked_params)

  @property
  def attacker_data(self) -> tuple[np.ndarray, np.ndarray]:
    """The attacker's clean uint8 images and labels: `data.attacker_fraction`, held out of D_C."""
    ds = self.dataset
    if ds.attacker_images is None or not len(ds.attacker_labels):
      raise CCDDError("no attacker data: set data.attacker_fraction > 0 (the run's own value)")
    return ds.attacker_images, ds.attacker_labels

  def restore_networks(self, name: str, arch: str | None = None) -> Any:
    """The stacked networks `evaluate` trained on set `name` (default: the distillation model)."""
    arch = arch or self.config.model.name
    return checkpoints.restore_networks(
      workdir_lib.networks_dir(self.workdir, arch, name),
      self.network(arch).like_params(),
      self.config.eval.num_seeds,
    )

  def evaluation_rngs(self, net: models.Network, count: int) -> tuple[Any, jax.Array]:
    """The initial parameters of `count` evaluation networks and the key of their batches."""
    init = net.init_params(self.jax_key(streams.EVAL_INIT), count)
    return init, self.jax_key(streams.EVAL_BATCHES)

  def data_threats_inputs(self) -> dict:
    """data_suite.run's inputs: both distilled sets, their networks, evaluate's rngs."""
    init_params, train_rng = self.evaluation_rngs(self.net, self.config.eval.num_seeds)
    names = evaluate.DISTILLED_SETS
    return {
      "network": self.net,
      "verifier": self.verifier(),
      "preprocessor": self.preprocess,
      "sets": {n: workdir_lib.load_distilled(self.workdir, n) for n in names},
      "networks": {n: self.restore_networks(n) for n in names},
      "attacker": self.attacker_data,
      "init_params": init_params,
      "train_rng": train_rng,
      "rng": self.np_rng(streams.DATA_THREATS),
    }

  def verifier(self, net: models.Network | None = None) -> verify.Verifier:
    """The owner's measurements of `net`'s networks (Acc, Acc_W, exact tests), made once."""
    apply = (net or self.net).apply
    if apply not in self._verifiers:
      ds, wcfg = self.dataset, self.config.watermark
      self._verifiers[apply] = verify.Verifier(
        predict=self.predictor(apply),
        to_inputs=self.preprocess.apply,
        key=self.key,
        test_images=ds.test_images,
        test_labels=ds.test_labels,
        n_patterns=wcfg.n_patterns,
        patch_size=self.patch_size,
        num_classes=ds.num_classes,
        m=wcfg.queries_per_pattern,
        alpha=wcfg.alpha,
        query_rng=lambda index: self.np_rng(streams.VERIFY_QUERIES, index),
        protocol=wcfg.queries,
        query_noise=wcfg.query_noise,
      )
    return self._verifiers[apply]
