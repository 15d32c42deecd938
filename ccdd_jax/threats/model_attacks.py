"""Removal attacks on a trained network, and the channel ranking the fp-enhanced expert uses.

What a pirate who holds a suspect network (or only its query interface) and
some clean data of its own tries, to make the owner's exact test fail. Each
model attack is a pure function `(apply_fn, params, config, data, rng,
*, strength) -> params` on stacked networks (leading axis = seeds, as
evaluate's trainers), where `config` is the `attacks` section of the config
and `data` holds the attacker's normalised images and labels; like the
experts, attacks take an `apply_fn` and never build a model. The `*_path`
variants yield the networks after each of several epoch counts of one run,
so that every strength costs no more than the longest.

  fine_tune      FT: SGD on the attacker's clean data, all layers or the last
                 ("head" Dense of every architecture) only; the CCDD paper's
                 Table 2 and WRT's fine-tuning (Lukas et al. 2022, Watermark-
                 Robustness-Toolbox: lr 0.001-0.01, 5-10 epochs).
  prune          NP: the last conv layer's channels with the lowest mean
                 activation on the attacker's clean data (`channel_activations`,
                 `prune_mask`) are cut off: the head's weights that read them
                 are zeroed, so they contribute exactly zero (structured
                 pruning of a channel; everything between those features and
                 the head is per channel: pooling, flattening).
  fine_prune     FP (Liu, Dolan-Gavitt and Garg 2018, "Fine-Pruning"): NP,
                 then FT of all layers with the cut weights held at zero.
  overwrite      the CCDD paper's Table 3: a new key's D_W built from the
                 attacker's data (`overwriting_set`), fine-tuned into the
                 network with the attacker's clean data (last layer, or all).
  extract        model extraction: a fresh network trained on the suspect's
                 soft labels (softmax of its logits, queried once per image)
                 over the attacker's images; WRT's strongest removal attack.
  jpeg, gaussian_blur, resize
                 input transformations at query time: a front end that
                 rewrites every query before the suspect sees it. They map
                 uint8 images to uint8 images; they do not touch parameters.

Every training attack runs `inner_loop.sgd_scan` (SGD, momentum and coupled
weight decay as torch.optim.SGD) at a constant learning rate, one compiled
epoch per call, with DSA on the attacker's batches when a DSA config is given.
"""

from collections.abc import Callable, Iterator, Sequence
import functools
import io
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from scipy import ndimage

from ccdd_jax.method import augment
from ccdd_jax.method import inner_loop
from ccdd_jax.method import pruning
from ccdd_jax.method import watermark

Params = Any
LAYERS = ("all", "head")


# ----------------------------------------------------------------------------
# Helpers on stacked networks.
# ----------------------------------------------------------------------------


def _num_networks(params: Params) -> int:
  return jax.tree_util.tree_leaves(params)[0].shape[0]


def _check_head(params: Params) -> None:
  if not isinstance(params, dict) or "head" not in params or "kernel" not in params["head"]:
    raise ValueError("attacks need params with a 'head' Dense layer (every models.py network)")


@functools.partial(jax.jit, static_argnums=0)
def _activation_sums(apply_fn, stacked_params, images):
  """Per network, the sum over `images` of `channel_activations` (times the batch)."""
  act = jax.vmap(lambda p: pruning.channel_activations(apply_fn, p, images))(stacked_params)
  return act * images.shape[0]


@functools.partial(jax.jit, static_argnums=0)
def _logits(apply_fn, stacked_params, images):
  return jax.vmap(lambda p: apply_fn(p, images))(stacked_params)


def _chunks(images: np.ndarray, size: int = 512) -> Iterator[jax.Array]:
  for start in range(0, len(images), size):
    yield jnp.asarray(images[start : start + size])


def mean_channel_activations(apply_fn, params: Params, images: np.ndarray) -> np.ndarray:
  """`channel_activations` of each stacked network over `images`, in chunks: [S, C]."""
  total = sum(_activation_sums(apply_fn, params, x) for x in _chunks(images))
  return np.asarray(total) / len(images)


def head_row_mask(params: Params, channel_masks: np.ndarray) -> np.ndarray:
  """Per network, which rows of the head kernel read a kept channel: [S, D] from [S, C] masks.

  The head reads the last conv block's features after per-channel pooling,
  flattened channel-last, so row r reads channel r mod C.
  """
  _check_head(params)
  rows, channels = params["head"]["kernel"].shape[1], channel_masks.shape[1]
  if rows % channels:
    raise ValueError(f"a head of {rows} input rows does not read {channels} channels")
  return np.tile(np.asarray(channel_masks), (1, rows // channels))


# ----------------------------------------------------------------------------
# Training on the attacker's data (one compiled epoch, vmapped over networks).
# ----------------------------------------------------------------------------


def _soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1))


@functools.cache
def _epoch_program(apply_fn, dsa, batch_size, momentum, weight_decay, head_only, soft):
  """Compiled `epoch(params, velocity, keep, images, targets, lr, rngs, family_rng)`."""

  def epoch(params, velocity, keep, images, targets, lr, rng, family_rng):
    rng_perm, rng_aug = jax.random.split(rng)
    batches = inner_loop.epoch_batches(rng_perm, images.shape[0], batch_size)
    steps = batches.shape[0]
    whole = lambda p: {**params, "head": p} if head_only else p

    def loss_fn(trainable, step_input):
      idx, rng_step, family_step = step_input
      x = images[idx]
      if dsa is not None:
        x = augment.augment(x, rng_step, dsa, family_rng=family_step)
      # `keep` (0/1) holds cut weights at zero: their gradient is zero, and so is their decay.
      logits = apply_fn(jax.tree_util.tree_map(jnp.multiply, whole(trainable), keep), x)
      if soft:
        return _soft_cross_entropy(logits, targets[idx])
      return inner_loop.cross_entropy(logits, targets[idx])

    trained, velocity, _ = inner_loop.sgd_scan(
      loss_fn,
      params["head"] if head_only else params,
      (batches, jax.random.split(rng_aug, steps), jax.random.split(family_rng, steps)),
      jnp.full((steps,), lr, jnp.float32),
      momentum=momentum,
      weight_decay=weight_decay,
      velocity=velocity,
    )
    return whole(trained), velocity

  targets_axis = 0 if soft else None  # Soft labels are each network's own teacher's.
  return jax.jit(jax.vmap(epoch, in_axes=(0, 0, 0, None, targets_axis, None, 0, None)))


def _train_path(
  apply_fn: Callable,
  params: Params,
  config,
  images: np.ndarray,
  targets: np.ndarray,
  rng: jax.Array,
  epochs: Sequence[int],
  *,
  layers: str = "all",
  keep: Params | None = None,
  dsa_config=None,
  lr: float | None = None,
) -> Iterator[tuple[int, Params]]:
  """Yields (e, params) after e epochs, for each e of `epochs`, of one SGD run on the data.

  `targets` are integer labels [N] (shared) or soft labels [S, N, K] (one set
  per network); `keep` is a 0/1 tree like `params` that holds weights at zero.
  """
  if layers not in LAYERS:
    raise ValueError(f"unknown layers {layers!r}: use {' or '.join(LAYERS)}")
  _check_head(params)
  epochs = sorted({int(e) for e in epochs})
  if not epochs or epochs[0] < 0:
    raise ValueError(f"epochs must be integers >= 0, got {epochs}")
  targets = np.asarray(targets)
  soft = targets.ndim == 3
  program = _epoch_program(
    apply_fn,
    None if dsa_config is None else augment.as_params(dsa_config),
    int(config.batch_size),
    float(config.momentum),
    float(config.weight_decay),
    layers == "head",
    soft,
  )
  num = _num_networks(params)
  params = jax.tree_util.tree_map(jnp.asarray, params)
  if keep is None:
    keep = jax.tree_util.tree_map(jnp.ones_like, params)
  velocity = jax.tree_util.tree_map(jnp.zeros_like, params["head"] if layers == "head" else params)
  images = jnp.asarray(images)
  targets = jnp.asarray(targets, jnp.float32 if soft else jnp.int32)
  lr = jnp.float32(config.lr if lr is None else lr)
  done = 0
  for target in epochs:
    while done < target:
      rng_epoch, family_rng = jax.random.split(jax.random.fold_in(rng, done))
      params, velocity = program(
        params, velocity, keep, images, targets, lr, jax.random.split(rng_epoch, num), family_rng
      )
      done += 1
    yield target, jax.device_get(params)


def _last(path: Iterator[tuple[int, Params]]) -> Params:
  return list(path)[-1][1]


# ----------------------------------------------------------------------------
# The attacks on parameters.
# ----------------------------------------------------------------------------


def fine_tune_path(
  apply_fn, params, config, data, rng, *, epochs, layers="all", dsa_config=None, keep=None
):
  """FT for each of `epochs` (one run): yields (epochs done, params) on the attacker's data."""
  return _train_path(
    apply_fn,
    params,
    config,
    data["images"],
    data["labels"],
    rng,
    epochs,
    layers=layers,
    keep=keep,
    dsa_config=dsa_config,
  )


def fine_tune(apply_fn, params, config, data, rng, *, epochs, layers="all", dsa_config=None):
  """FT: `epochs` epochs of SGD on the attacker's clean data, all layers or the head only."""
  path = fine_tune_path(
    apply_fn, params, config, data, rng, epochs=(epochs,), layers=layers, dsa_config=dsa_config
  )
  return _last(path)


def prune_with_mask(apply_fn, params, data, *, ratio) -> tuple[Params, Params]:
  """NP, and the 0/1 tree (like `params`) that marks the weights it zeroed."""
  _check_head(params)
  activations = mean_channel_activations(apply_fn, params, np.asarray(data["images"]))
  channel_masks = np.stack([np.asarray(pruning.prune_mask(a, ratio)) for a in activations])
  rows = head_row_mask(params, channel_masks)[:, :, None]  # [S, D, 1]
  kernel = np.asarray(params["head"]["kernel"])
  pruned = {**params, "head": {**params["head"], "kernel": np.where(rows > 0, kernel, 0)}}
  keep = jax.tree_util.tree_map(np.ones_like, params)
  keep["head"]["kernel"] = np.broadcast_to(rows, kernel.shape).astype(kernel.dtype)
  return pruned, keep


def prune(apply_fn, params, config, data, rng=None, *, ratio):
  """NP: cuts the `ratio` least active last-conv channels (on the attacker's data) off the head.

  Only the head kernel's rows that read those channels change (to zero), so
  the network computes exactly what it would with those channels zeroed
  (`channel_mask`). `config` and `rng` are unused: pruning needs no training.
  """
  del config, rng
  return prune_with_mask(apply_fn, params, data, ratio=ratio)[0]


def fine_prune_path(apply_fn, params, config, data, rng, *, ratio, epochs, dsa_config=None):
  """FP for each of `epochs` (one run): NP at `ratio`, then FT of all layers, cut weights at 0."""
  pruned, keep = prune_with_mask(apply_fn, params, data, ratio=ratio)
  return fine_tune_path(
    apply_fn, pruned, config, data, rng, epochs=epochs, dsa_config=dsa_config, keep=keep
  )


def fine_prune(apply_fn, params, config, data, rng, *, ratio, epochs, dsa_config=None):
  """FP (Liu et al. 2018): NP at `ratio`, then `epochs` epochs of FT, cut weights held at zero."""
  path = fine_prune_path(
    apply_fn, params, config, data, rng, ratio=ratio, epochs=(epochs,), dsa_config=dsa_config
  )
  return _last(path)


def overwriting_set(
  images: np.ndarray,
  labels: np.ndarray,
  key: bytes,
  *,
  n_patterns: int,
  patch_size: int,
  num_classes: int,
  ratio: float,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
  """The pirate's D_W: `key`'s patterns on round(ratio N) of its uint8 images, relabelled."""
  patterns, pattern_labels = watermark.expand_key(
    key, n_patterns, patch_size, images.shape[-1], num_classes
  )
  wm_images, wm_labels, _ = watermark.make_watermark_set(
    images, labels, patterns, pattern_labels, ratio, rng
  )
  return wm_images, wm_labels


def overwrite_path(apply_fn, params, config, data, rng, *, epochs, layers="head", dsa_config=None):
  """Overwriting for each of `epochs` (one run): FT on clean data plus the pirate's D_W.

  `data` holds the attacker's clean `images` / `labels` and its own
  watermark set `wm_images` / `wm_labels` (normalised, `overwriting_set`).
  """
  images = np.concatenate([np.asarray(data["images"]), np.asarray(data["wm_images"])])
  labels = np.concatenate([np.asarray(data["labels"]), np.asarray(data["wm_labels"])])
  return _train_path(
    apply_fn, params, config, images, labels, rng, epochs, layers=layers, dsa_config=dsa_config
  )


def overwrite(apply_fn, params, config, data, rng, *, epochs, layers="head", dsa_config=None):
  """Overwriting (Table 3): `epochs` epochs of FT on clean data plus a new key's D_W."""
  path = overwrite_path(
    apply_fn, params, config, data, rng, epochs=(epochs,), layers=layers, dsa_config=dsa_config
  )
  return _last(path)


def soft_labels(apply_fn, params, images: np.ndarray) -> np.ndarray:
  """Each stacked network's softmax outputs on `images`: [S, N, K]."""
  logits = np.concatenate([np.asarray(_logits(apply_fn, params, x)) for x in _chunks(images)], 1)
  return np.asarray(jax.nn.softmax(logits, axis=-1))


def extract_path(apply_fn, params, config, data, rng, *, epochs, init_params, dsa_config=None):
  """Extraction for each of `epochs` (one run): fresh networks on the suspects' soft labels.

  Student s starts from `init_params[s]` (stacked like `params`, same
  architecture) and learns network s's softmax outputs on the attacker's
  images, at `config.extraction_lr`.
  """
  targets = soft_labels(apply_fn, params, np.asarray(data["images"]))
  return _train_path(
    apply_fn,
    init_params,
    config,
    data["images"],
    targets,
    rng,
    epochs,
    dsa_config=dsa_config,
    lr=config.extraction_lr,
  )


def extract(apply_fn, params, config, data, rng, *, epochs, init_params, dsa_config=None):
  """Model extraction: `epochs` epochs of a fresh network on the suspect's soft labels."""
  path = extract_path(
    apply_fn,
    params,
    config,
    data,
    rng,
    epochs=(epochs,),
    init_params=init_params,
    dsa_config=dsa_config,
  )
  return _last(path)


# ----------------------------------------------------------------------------
# Input transformations at query time (uint8 NHWC -> uint8 NHWC).
# ----------------------------------------------------------------------------


def _check_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"expected uint8 images [N, H, W, C], got {images.dtype} {images.shape}")
  if images.shape[-1] not in (1, 3):
    raise ValueError(f"expected 1 or 3 channels, got {images.shape[-1]}")
  return images


def _pil_map(images: np.ndarray, fn: Callable[[Image.Image], Image.Image]) -> np.ndarray:
  out = np.empty_like(images)
  for i, image in enumerate(images):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out[i] = np.asarray(fn(pil)).reshape(image.shape)
  return out


def jpeg(images: np.ndarray, quality: int) -> np.ndarray:
  """Each image JPEG-encoded at `quality` (1-95, PIL) and decoded again."""
  images = _check_images(images)

  def encode(pil):
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=int(quality))
    return Image.open(io.BytesIO(buffer.getvalue()))

  return _pil_map(images, encode)


def gaussian_blur(images: np.ndarray, sigma: float) -> np.ndarray:
  """Each image blurred by a Gaussian of `sigma` pixels (reflecting edges), rounded to uint8."""
  images = _check_images(images)
  blurred = ndimage.gaussian_filter(images.astype(np.float32), (0, sigma, sigma, 0), mode="reflect")
  return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


def resize(images: np.ndarray, factor: float) -> np.ndarray:
  """Each image resized to `factor` times its side and back (bilinear, PIL)."""
  images = _check_images(images)
  height, width = images.shape[1:3]
  small = (max(1, round(width * factor)), max(1, round(height * factor)))
  return _pil_map(
    images,
    lambda pil: pil.resize(small, Image.Resampling.BILINEAR).resize(
      (width, height), Image.Resampling.BILINEAR
    ),
  )


INPUT_TRANSFORMS = {"jpeg": jpeg, "blur": gaussian_blur, "resize": resize}
