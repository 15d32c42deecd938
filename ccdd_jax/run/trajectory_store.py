"""Where distillation reads the experts' trajectories: host memory, or one flat file per kind.

`distill.trajectory_store` (trajectory_pairs.TRAJECTORY_STORES) picks:

  memory  checkpoints.load_flat_trajectories: numpy [E, T, P] per kind, all in RAM.
  file    `trajectories/flat/<kind>.npy`: a float32 [E, T, P] array in NumPy's .npy
          format, built once from the Orbax checkpoints one expert at a time (never
          more than one expert's T x P in memory) and written sequentially, then read
          by `FileTrajectories`, one [P] vector per `[e, t]` (os.preadv): the 4 vectors
          of an iteration's pair (trajectory_pairs.select_pair), read on the host while
          the previous step runs, as with the memory store.
  auto    file when the kinds' E x T x P x 4 bytes exceed half of the host's memory
          (`host_memory_bytes`), else memory.

The values are bit for bit those of the memory store (the same leaves, concatenated in
ravel_pytree's order), so the choice never changes a result (manifest.IGNORED). Reads go
through the page cache, not the process: the resident memory stays that of the pairs.
Each `<kind>.npy` has a `<kind>.json` beside it, written last, naming its experts, epochs,
parameter count and a digest of the experts' meta.json (text and mtime); a store that does
not match the experts on disk (retrained, more epochs) is rebuilt. Process 0 builds, the
others wait.
"""

import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.devices import sharding
from ccdd_jax.log import log
from ccdd_jax.run import checkpoints

FLAT_DIR = "flat"
DTYPE = np.dtype("<f4")


class FileTrajectories:
  """[E, T, P] float32 trajectories in an .npy file; `[e, t]` reads one [P] vector from disk."""

  def __init__(self, path: os.PathLike):
    self.path = pathlib.Path(path)
    with open(self.path, "rb") as f:
      version = np.lib.format.read_magic(f)
      readers = {(1, 0): np.lib.format.read_array_header_1_0}
      readers[(2, 0)] = np.lib.format.read_array_header_2_0
      shape, fortran, dtype = readers[version](f)
      self.offset = f.tell()
    if len(shape) != 3 or fortran or np.dtype(dtype) != DTYPE:
      raise CCDDError(f"{self.path} is not a float32 [experts, epochs, P] trajectory store")
    expected = self.offset + int(np.prod(shape)) * DTYPE.itemsize
    if self.path.stat().st_size != expected:
      raise CCDDError(f"{self.path} is truncated: delete it, the next distillation rebuilds it")
    self.shape, self.dtype, self.ndim = tuple(int(n) for n in shape), DTYPE, 3
    self._fd = os.open(self.path, os.O_RDONLY)

  def __getitem__(self, index: tuple) -> np.ndarray:
    """The flat parameters of expert e at epoch t (negative indices count from the end)."""
    e, t = (self._bound(int(i), n) for i, n in zip(index, self.shape[:2], strict=True))
    out = np.empty(self.shape[2], DTYPE)
    where = self.offset + (e * self.shape[1] + t) * out.nbytes
    if os.preadv(self._fd, [out], where) != out.nbytes:
      raise CCDDError(f"{self.path} is truncated: delete it, the next distillation rebuilds it")
    return out

  def __array__(self, *args, **kwargs):
    raise TypeError(f"{self.path} is read one [e, t] vector at a time (np.load it to load all)")

  def __del__(self):
    if getattr(self, "_fd", None) is not None:
      os.close(self._fd)
      self._fd = None

  @staticmethod
  def _bound(i: int, n: int) -> int:
    if not -n <= i < n:
      raise IndexError(f"index {i} out of range for an axis of {n}")
    return i % n


def num_params(like: Any) -> int:
  """P: the length of the flat parameter vector of a network shaped like `like`."""
  return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(like)))


def estimate_bytes(root: os.PathLike, kinds, like: Any, epochs: int) -> int:
  """Bytes of the trajectories distillation reads: sum over kinds of E x T x P x 4."""
  experts = sum(len(checkpoints.list_experts(root, kind)) for kind in set(kinds))
  return experts * epochs * num_params(like) * DTYPE.itemsize


def host_memory_bytes() -> int:
  """This host's physical memory, or the memory limit of its cgroup (v2) where lower."""
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  try:
    limit = pathlib.Path("/sys/fs/cgroup/memory.max").read_text().strip()
  except OSError:
    return total
  return min(total, int(limit)) if limit.isdigit() else total


def resolve(store: str, nbytes: int, host_bytes: int | None = None) -> str:
  """ "memory" or "file" for distill.trajectory_store `store` ("auto": file past half the host)."""
  if store != "auto":
    return store
  host = host_memory_bytes() if host_bytes is None else host_bytes
  return "file" if nbytes > host // 2 else "memory"


def load(root: os.PathLike, kinds, like: Any, epochs: int, store: str = "auto") -> dict:
  """Every kind's trajectories [E, T, P] (epochs 0..epochs-1): numpy, or FileTrajectories."""
  kinds = tuple(dict.fromkeys(kinds))
  nbytes = estimate_bytes(root, kinds, like, epochs)
  if resolve(store, nbytes) == "memory":
    return {k: checkpoints.load_flat_trajectories(root, k, like, epochs) for k in kinds}
  log(
    f"[distill] trajectories of {', '.join(kinds)}: {nbytes / 2**20:,.1f} MiB, read from "
    f"{pathlib.Path(root) / FLAT_DIR} one pair at a time (distill.trajectory_store = {store})"
  )
  return {k: open_flat(root, k, like, epochs) for k in kinds}


def open_flat(root: os.PathLike, kind: str, like: Any, epochs: int) -> FileTrajectories:
  """`kind`'s file store (epochs 0..epochs-1 of every expert), built first where stale."""
  path = pathlib.Path(root) / FLAT_DIR / f"{kind}.npy"
  tag = _tag(root, kind, like, epochs)
  tag_file = path.with_suffix(".json")
  current = tag_file.is_file() and path.is_file() and json.loads(tag_file.read_text()) == tag
  sharding.barrier(f"ccdd checked the {kind} trajectory store")
  if not current and sharding.is_writer():
    build_flat(root, kind, like, epochs, path)
    tag_file.with_name(tag_file.name + ".tmp").write_text(json.dumps(tag, indent=2) + "\n")
    os.replace(tag_file.with_name(tag_file.name + ".tmp"), tag_file)  # Marks it complete.
  sharding.barrier(f"ccdd built the {kind} trajectory store")
  return FileTrajectories(path)


def build_flat(root: os.PathLike, kind: str, like: Any, epochs: int, path: os.PathLike) -> None:
  """Writes `kind`'s experts' epochs 0..epochs-1 as one float32 [E, T, P] .npy, expert by expert."""
  indices, path = checkpoints.list_experts(root, kind), pathlib.Path(path)
  if any(np.dtype(leaf.dtype) != DTYPE for leaf in jax.tree_util.tree_leaves(like)):
    raise ValueError("a file trajectory store holds float32 parameters only")
  shape = (len(indices), epochs, num_params(like))
  log(
    f"[distill] writing the {kind} trajectory store {path} ({np.prod(shape) * 4 / 2**20:,.1f} MiB)"
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  header = {"descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False, "shape": shape}
  with open(tmp, "wb") as f:
    np.lib.format.write_array_header_1_0(f, header)
    for flat in checkpoints.flat_experts(root, kind, like, epochs):  # [T, P], one at a time.
      f.write(np.ascontiguousarray(flat, DTYPE).tobytes())
  os.replace(tmp, path)


def _tag(root: os.PathLike, kind: str, like: Any, epochs: int) -> dict:
  """What a file store was built from: its experts (a digest of their meta.json), T and P."""
  indices, digest = checkpoints.list_experts(root, kind), hashlib.sha256()
  for index in indices:  # Its text and when it was written: a retrained expert rewrites it.
    meta = pathlib.Path(root) / kind / f"{index:04d}" / checkpoints.META_FILE
    digest.update(meta.read_bytes() + str(meta.stat().st_mtime_ns).encode())
  return {
    "kind": kind,
    "experts": indices,
    "epochs": epochs,
    "params": num_params(like),
    "experts_digest": digest.hexdigest(),
  }
