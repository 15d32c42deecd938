"""Orbax I/O of the run: expert trajectories and evaluated networks.

Trajectories. An expert is identified by its kind ("clean", "watermarked" or "fp_enhanced")
and an integer index. Its trajectory is one parameter pytree per epoch: epoch 0
holds the initial parameters and epoch e the parameters after e epochs.

Layout on disk, one synchronous Orbax PyTree checkpoint per expert::

  <root>/<kind>/<index:04d>/trajectory/  {"epoch_0000": params, "epoch_0001": ...}
  <root>/<kind>/<index:04d>/meta.json    {"kind", "index", "num_epochs",
                                          "format_version", "leaves", **metadata}

A single (expert, epoch) is restored with Orbax's partial restore: every other
epoch's leaves are `ocp.PLACEHOLDER`, so Orbax does not read them. One
checkpoint per expert rather than per epoch keeps saving fast, because Orbax
has a fixed cost of ~20 ms per checkpoint on top of ~1.5 ms per leaf.

`meta.json` is written last, so an expert is complete (and listed by
`list_experts`) only once its checkpoint is finalised. Its "leaves" entry maps
each leaf's key path to "dtype[shape]" and is checked against `like` on restore
(Orbax would otherwise silently cast dtypes).

Evaluated networks. The networks trained on one set with one architecture
are saved stacked (leading axis = seeds) as one Orbax checkpoint
(`save_networks` / `restore_networks`).
"""

from collections.abc import Iterator, Mapping, Sequence
import json
import logging
import os
import pathlib
import re
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ccdd_jax import CCDDError
from ccdd_jax.devices import sharding
from ccdd_jax.method.experts import KINDS

PyTree = Any
PathLike = str | os.PathLike

FORMAT_VERSION = 1
META_FILE = "meta.json"
CHECKPOINT_DIR = "trajectory"
_RESERVED_META_KEYS = ("kind", "index", "num_epochs", "format_version", "leaves")
_EXPERT_DIR_RE = re.compile(r"^\d{4,}$")
_HINT = "run --stage=experts first"


class _DropOrbaxInfo(logging.Filter):
  """Drops sub-WARNING records that come from inside the orbax package."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return "/orbax/" not in record.pathname.replace("\\", "/")


_ORBAX_FILTER = _DropOrbaxInfo()


def _quiet_orbax() -> None:
  """Keeps Orbax's per-step INFO chatter off the console; other logs are untouched."""
  # Orbax logs through absl, i.e. the shared "absl" logger, so the filter only
  # drops records emitted from files inside the orbax package.
  absl_logger = logging.getLogger("absl")
  if _ORBAX_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_ORBAX_FILTER)
  orbax_logger = logging.getLogger("orbax")
  if orbax_logger.level == logging.NOTSET:
    orbax_logger.setLevel(logging.WARNING)


def _checkpointer() -> ocp.Checkpointer:
  """A synchronous PyTree checkpointer: save() returns once the checkpoint is final."""
  _quiet_orbax()
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler())


def _check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"unknown expert kind {kind!r}: expected one of {', '.join(KINDS)}")
  return kind


def _check_index(index: int, what: str = "expert index") -> int:
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"{what} must be a non-negative integer, got {index!r}")
  return int(index)


def _expert_name(kind: str, index: int) -> str:
  return f"{kind}/{index:04d}"


def _epoch_key(epoch: int) -> str:
  return f"epoch_{epoch:04d}"


def _expert_dir(root: PathLike, kind: str, index: int) -> pathlib.Path:
  return pathlib.Path(root) / _check_kind(kind) / f"{_check_index(index):04d}"


def _abstract(like: PyTree) -> PyTree:
  """Shape/dtype structs without sharding, so that Orbax restores numpy arrays."""

  def leaf(x):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
      x = np.asarray(x)
    return jax.ShapeDtypeStruct(tuple(x.shape), np.dtype(x.dtype))

  return jax.tree.map(leaf, like)


def _leaf_specs(tree: PyTree) -> dict[str, str]:
  """Maps each leaf's key path to "dtype[shape]", e.g. "float32[3, 3, 3, 128]"."""
  flat, _ = jax.tree_util.tree_flatten_with_path(_abstract(tree))
  return {
    jax.tree_util.keystr(path): f"{np.dtype(s.dtype).name}{list(s.shape)}" for path, s in flat
  }


def _check_like(where: str, saved: Mapping[str, str], like: Mapping[str, str]) -> None:
  """Raises a CCDDError if `like` does not describe the saved leaves exactly."""
  if saved == like:
    return
  for key in sorted(set(saved) | set(like)):
    if saved.get(key) != like.get(key):
      raise CCDDError(
        f"cannot restore {where} with the given parameter structure: leaf {key} is "
        f"{saved.get(key, 'absent')} on disk but {like.get(key, 'absent')} in `like`"
      )


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.ndarray, np.generic, jax.Array)):
    array = np.asarray(obj)
    return array.item() if array.ndim == 0 else array.tolist()
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _meta_json(meta: Mapping[str, Any], expert_name: str) -> str:
  try:
    return json.dumps(dict(meta), indent=2, sort_keys=True, default=_json_default) + "\n"
  except (TypeError, ValueError) as e:
    raise TypeError(f"metadata for expert {expert_name} is not JSON serialisable: {e}") from e


def _write_atomically(path: pathlib.Path, text: str) -> None:
  if not sharding.is_writer():  # Process 0 only (Orbax coordinates its own writes).
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _to_numpy_tree(tree: PyTree) -> PyTree:
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _split_epochs(params_per_epoch: Sequence[PyTree] | PyTree) -> list[PyTree]:
  """Turns a list of per-epoch trees or a tree stacked on axis 0 into a list."""
  if isinstance(params_per_epoch, (list, tuple)):
    epochs = [_to_numpy_tree(p) for p in params_per_epoch]
  else:
    stacked = _to_numpy_tree(params_per_epoch)
    leaves = jax.tree.leaves(stacked)
    if not leaves:
      raise ValueError("stacked trajectory has no array leaves")
    lengths = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(lengths) != 1 or None in lengths:
      raise ValueError(
        f"stacked trajectory leaves disagree on the leading epoch axis: {sorted(map(str, lengths))}"
      )
    epochs = [jax.tree.map(lambda x, e=e: x[e], stacked) for e in range(lengths.pop())]
  if not epochs:
    raise ValueError("trajectory is empty: need at least the initial parameters (epoch 0)")
  return epochs


def save_trajectory(
  root: PathLike,
  kind: str,
  index: int,
  params_per_epoch: Sequence[PyTree] | PyTree,
  metadata: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> pathlib.Path:
  """Saves one expert's trajectory (list of per-epoch trees or a tree stacked on epochs)."""
  index = _check_index(index)
  expert_dir = _expert_dir(root, kind, index)
  name = _expert_name(kind, index)
  metadata = dict(metadata or {})
  clash = sorted(set(metadata) & set(_RESERVED_META_KEYS))
  if clash:
    raise ValueError(f"trajectory metadata may not set reserved keys {clash}")
  epochs = _split_epochs(params_per_epoch)
  specs = _leaf_specs(epochs[0])
  if not specs:
    raise ValueError(f"parameters of expert {name} have no array leaves")
  for epoch, params in enumerate(epochs[1:], start=1):
    if _leaf_specs(params) != specs:
      raise ValueError(
        f"epoch {epoch} of expert {name} differs from epoch 0 in parameter "
        "structure, shape or dtype"
      )
  # Serialise the metadata first so that bad metadata leaves nothing on disk.
  meta_text = _meta_json(
    {
      "kind": kind,
      "index": index,
      "num_epochs": len(epochs) - 1,
      "format_version": FORMAT_VERSION,
      "leaves": specs,
      **metadata,
    },
    name,
  )
  if expert_dir.exists() and not overwrite:
    raise ValueError(
      f"trajectory for expert {name} already exists in {expert_dir}: "
      "delete it or save with overwrite=True"
    )
  sharding.barrier(f"ccdd checked {name}")  # Every process looked before process 0 replaces it.
  if sharding.is_writer():
    shutil.rmtree(expert_dir, ignore_errors=True)
    expert_dir.mkdir(parents=True)
  sharding.barrier(f"ccdd made {name}")
  item = {_epoch_key(e): params for e, params in enumerate(epochs)}
  ckptr = _checkpointer()
  try:
    ckptr.save((expert_dir / CHECKPOINT_DIR).absolute(), args=ocp.args.PyTreeSave(item))
  finally:
    ckptr.close()
  _write_atomically(expert_dir / META_FILE, meta_text)  # Marks the expert complete.
  return expert_dir


def save_stacked(
  root: PathLike,
  kind: str,
  stacked_params: PyTree,
  start_index: int = 0,
  metadata_per_expert: Sequence[Mapping[str, Any] | None] | None = None,
  overwrite: bool = False,
) -> list[int]:
  """Saves experts stacked as [num_experts, num_epochs + 1, ...]; returns their indices."""
  start_index = _check_index(start_index, "start_index")
  stacked = _to_numpy_tree(stacked_params)
  leaves = jax.tree.leaves(stacked)
  if not leaves or any(leaf.ndim < 2 for leaf in leaves):
    raise ValueError("stacked trajectories need leaves shaped [num_experts, num_epochs + 1, ...]")
  counts = {leaf.shape[0] for leaf in leaves}
  if len(counts) != 1:
    raise ValueError(f"stacked trajectory leaves disagree on the expert axis: {sorted(counts)}")
  num_experts = counts.pop()
  if metadata_per_expert is not None and len(metadata_per_expert) != num_experts:
    raise ValueError(f"got {len(metadata_per_expert)} metadata dicts for {num_experts} experts")
  indices = []
  for i in range(num_experts):
    meta = metadata_per_expert[i] if metadata_per_expert is not None else None
    save_trajectory(
      root,
      kind,
      start_index + i,
      jax.tree.map(lambda x, i=i: x[i], stacked),
      metadata=meta,
      overwrite=overwrite,
    )
    indices.append(start_index + i)
  return indices


def list_experts(root: PathLike, kind: str) -> list[int]:
  """Sorted indices of the complete experts of `kind` under `root` ([] if none)."""
  kind_dir = pathlib.Path(root) / _check_kind(kind)
  if not kind_dir.is_dir():
    return []
  return sorted(
    int(p.name)
    for p in kind_dir.iterdir()
    if _EXPERT_DIR_RE.match(p.name) and (p / META_FILE).is_file()
  )


def read_meta(root: PathLike, kind: str, index: int) -> dict[str, Any]:
  """Reads an expert's meta.json (kind, index, num_epochs, leaves and user metadata)."""
  expert_dir = _expert_dir(root, kind, index)
  name = _expert_name(kind, int(index))
  if not pathlib.Path(root).is_dir():
    raise CCDDError(f"no trajectories directory {root}: {_HINT}")
  if not expert_dir.is_dir():
    raise CCDDError(f"no trajectory for expert {name} under {root}: {_HINT}")
  path = expert_dir / META_FILE
  if not path.is_file():
    raise CCDDError(
      f"trajectory of expert {name} under {root} is incomplete (no {META_FILE}): {_HINT}"
    )
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CCDDError(f"cannot read {path}: {e}") from e


def num_epochs(root: PathLike, kind: str, index: int) -> int:
  """Number of training epochs of an expert (its trajectory has num_epochs + 1 entries)."""
  return int(read_meta(root, kind, index)["num_epochs"])


def _restore_epochs(
  ckptr: ocp.Checkpointer,
  root: PathLike,
  kind: str,
  index: int,
  epochs: Sequence[int],
  abstract: PyTree,
) -> dict[int, PyTree]:
  """Restores only the given epochs of one expert; the others are not read."""
  meta = read_meta(root, kind, index)
  name = _expert_name(kind, int(index))
  n = int(meta["num_epochs"])
  for epoch in epochs:
    if _check_index(epoch, "epoch") > n:
      raise CCDDError(
        f"no trajectory for expert {name} epoch {epoch} under {root}: "
        f"the expert has epochs 0..{n} only"
      )
  path = _expert_dir(root, kind, index) / CHECKPOINT_DIR
  if not path.is_dir():
    raise CCDDError(
      f"no trajectory checkpoint for expert {name} under {root} ({path} is missing): {_HINT}"
    )
  like_specs = _leaf_specs(abstract)
  _check_like(f"expert {name}", meta["leaves"], like_specs)
  wanted = set(epochs)
  skipped = jax.tree.map(lambda _: ocp.PLACEHOLDER, abstract)
  item = {_epoch_key(e): abstract if e in wanted else skipped for e in range(n + 1)}
  try:
    restored = ckptr.restore(
      path.absolute(),
      args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item)
      ),
    )
  except Exception as e:  # Orbax raises assorted types for bad or mismatched checkpoints.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CCDDError(f"cannot restore the trajectory of expert {name} from {path}: {msg}") from e
  out = {}
  for epoch in wanted:
    params = jax.tree.map(np.asarray, restored[_epoch_key(epoch)])
    _check_like(f"expert {name} epoch {epoch}", _leaf_specs(params), like_specs)
    out[epoch] = params
  return out


def restore_params(root: PathLike, kind: str, index: int, epoch: int, like: PyTree) -> PyTree:
  """Restores one expert's params at one epoch as numpy arrays shaped like `like`."""
  epoch = _check_index(epoch, "epoch")
  ckptr = _checkpointer()
  try:
    return _restore_epochs(ckptr, root, kind, index, [epoch], _abstract(like))[epoch]
  finally:
    ckptr.close()


def restore_epochs(
  root: PathLike, kind: str, index: int, epochs: Sequence[int], like: PyTree
) -> dict[int, PyTree]:
  """Restores the given epochs of one expert as numpy trees shaped like `like` (no other read)."""
  epochs = [_check_index(e, "epoch") for e in epochs]
  ckptr = _checkpointer()
  try:
    return _restore_epochs(ckptr, root, kind, index, epochs, _abstract(like))
  finally:
    ckptr.close()


def load_trajectories(
  root: PathLike,
  kind: str,
  like: PyTree,
  epochs: Sequence[int] | None = None,
  indices: Sequence[int] | None = None,
) -> PyTree:
  """Loads selected epochs of experts as numpy leaves [num_experts, num_epochs, ...]."""
  if not pathlib.Path(root).is_dir():
    raise CCDDError(f"no trajectories directory {root}: {_HINT}")
  if indices is None:
    indices = list_experts(root, kind)
    if not indices:
      raise CCDDError(f"no {kind} expert trajectories under {root}: {_HINT}")
  indices = [_check_index(i) for i in indices]
  if not indices:
    raise ValueError("load_trajectories got an empty list of expert indices")
  if epochs is None:
    counts = {num_epochs(root, kind, i) for i in indices}
    if len(counts) != 1:
      raise CCDDError(
        f"{kind} experts under {root} have different epoch counts "
        f"{sorted(counts)}: pass epochs= explicitly"
      )
    epochs = range(counts.pop() + 1)
  epochs = [_check_index(e, "epoch") for e in epochs]
  if not epochs:
    raise ValueError("load_trajectories got an empty list of epochs")
  abstract = _abstract(like)
  out_leaves, treedef = jax.tree.flatten(
    jax.tree.map(
      lambda s: np.empty((len(indices), len(epochs)) + tuple(s.shape), s.dtype), abstract
    )
  )
  ckptr = _checkpointer()
  try:
    for a, index in enumerate(indices):
      restored = _restore_epochs(ckptr, root, kind, index, epochs, abstract)
      for b, epoch in enumerate(epochs):
        for dst, src in zip(out_leaves, treedef.flatten_up_to(restored[epoch])):
          dst[a, b] = src
  finally:
    ckptr.close()
  return jax.tree.unflatten(treedef, out_leaves)


def flat_experts(root: PathLike, kind: str, like: PyTree, epochs: int) -> Iterator[np.ndarray]:
  """Each expert of `kind` in turn (list_experts' order): epochs 0..epochs-1 flat [epochs, P].

  The leaves are concatenated in `ravel_pytree`'s order (no arithmetic: the same bits), in
  numpy, so that only one expert's epochs are in memory at a time.
  """
  if not pathlib.Path(root).is_dir():
    raise CCDDError(f"no trajectories directory {root}: {_HINT}")
  indices = list_experts(root, kind)
  if not indices:
    raise CCDDError(f"no {kind} expert trajectories under {root}: {_HINT}")
  for index in indices:
    restored = restore_epochs(root, kind, index, range(epochs), like)
    yield np.stack(
      [
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(restored.pop(e))])
        for e in range(epochs)
      ]
    )


def load_flat_trajectories(root: PathLike, kind: str, like: PyTree, epochs: int) -> np.ndarray:
  """Epochs 0..epochs-1 of every expert of `kind` as flat vectors [experts, epochs, P]."""
  out = None
  for a, flat in enumerate(flat_experts(root, kind, like, epochs)):
    if out is None:  # Filled in place: the trajectories are held once.
      out = np.empty((len(list_experts(root, kind)), *flat.shape), flat.dtype)
    out[a] = flat
  return out


def save_networks(path: PathLike, stacked_params: PyTree) -> None:
  """Saves stacked evaluation networks (leading axis = seeds) as one Orbax checkpoint."""
  path = pathlib.Path(path)
  if sharding.is_writer():  # Orbax writes the checkpoint from every process itself.
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
  sharding.barrier(f"ccdd cleared {path.name} networks")
  _quiet_orbax()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path.absolute(), stacked_params)
  ckptr.wait_until_finished()
  ckptr.close()


def restore_networks(path: PathLike, like: PyTree, num_seeds: int) -> PyTree:
  """Restores `num_seeds` stacked networks shaped like `like` saved by `save_networks`."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise CCDDError(f"no evaluated networks at {path}: run --stage=evaluate first")
  abstract = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct((num_seeds,) + tuple(s.shape), s.dtype), like
  )
  _quiet_orbax()
  ckptr = ocp.StandardCheckpointer()
  try:
    return jax.tree.map(np.asarray, ckptr.restore(path.absolute(), abstract))
  except Exception as e:  # Orbax raises assorted types for bad or mismatched checkpoints.
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CCDDError(
      f"cannot restore the evaluated networks at {path}, corrupt or truncated ({msg[:300]}): "
      "rerun --stage=evaluate"
    ) from e
  finally:
    ckptr.close()
