"""Black-box verification: a query file for the suspect, its answers back from a file.

A data owner in a dispute rarely holds the suspect's weights or framework.
`write_queries` stamps held-out images with the key's patterns and writes
them, shuffled, as the only array of `queries.npz`; the suspect's operator
runs any model on them and returns one predicted class per query, in order;
`verify_file` regroups the answers by pattern with the key alone and decides
with the same exact test as the white-box path (`verify.decide`). With
`watermark.queries = "key_derived"` the file holds the key-derived queries
instead (`query_set`; docs/watermark-spec.md section 9), in the same kind of
key-seeded order.

Nothing but the key file need be kept: which held-out image carries which
pattern, and the shuffle, come from a generator seeded with
SHA-256("ccdd/queries\\x00" ‖ key) (`query_plan`), domain separated from the
hashes that make the patterns and the labels, so the queries are independent
of the labels y_i and the test stays exact (docs/watermark-spec.md, section 8).

The key commitment, `watermark.key_commitment` (64 hex digits, whose first 16
are the key's fingerprint), is written beside the key by keygen
(`keep_commitment`) to be published before release; `check_commitment`
refuses a key that does not match a published one.

I/O sits here with the checks on users' files; CCDDError (one line) for a
file a user can fix.
"""

import os
import pathlib
import re
import zipfile

import ml_collections
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.data import datasets
from ccdd_jax.devices import sharding
from ccdd_jax.log import log
from ccdd_jax.method import key_queries
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.run import stages
from ccdd_jax.run.reporting import write_json

QUERIES_FILE = "queries.npz"
COMMITMENT_FILE = "owner.commitment"
RESULT_FILE = "verification_blackbox.json"
_NPY_MAGIC = b"\x93NUMPY"
_INTEGER = re.compile(r"-?[0-9]+")
_HEX_COMMITMENT = re.compile(r"[0-9a-fA-F]{64}")


# ----------------------------------------------------------------------------
# The queries.
# ----------------------------------------------------------------------------


def query_set(
  key: bytes, dataset: datasets.Dataset, patterns: np.ndarray, wcfg: ml_collections.ConfigDict
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray | None]]:
  """The queries uint8 [Q, H, W, C] in file order and their plan: (pattern ids, own classes).

  `watermark.queries` picks the protocol: "stamped" (held-out images, `verify.make_queries`;
  own classes = the held-out labels) or "key_derived" (`key_queries.key_query_images`,
  shuffled by `verify.query_rng(key)`; no own class: None).
  """
  m = wcfg.queries_per_pattern
  if wcfg.queries == "key_derived":
    m, shape = m or len(dataset.test_labels), dataset.image_shape
    images, ids = key_queries.key_query_images(key, patterns, shape, m, wcfg.query_noise, "verify")
    order = verify.query_rng(key).permutation(len(ids))
    return images[order], (ids[order], None)
  images, carrier_ids, ids = verify.make_queries(key, dataset.test_images, patterns, m)
  return images, (ids, dataset.test_labels[carrier_ids])


def write_queries(
  workdir: pathlib.Path,
  key: bytes,
  dataset: datasets.Dataset,
  patterns: np.ndarray,
  wcfg: ml_collections.ConfigDict,
) -> dict:
  """Writes `workdir/queries.npz` holding one array, `images` (nothing else); returns a summary."""
  queries = query_set(key, dataset, patterns, wcfg)[0]
  path = pathlib.Path(workdir) / QUERIES_FILE
  if sharding.is_writer():  # Process 0 only.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
      np.savez(f, images=queries)
    os.replace(tmp, path)
  kind = "key-derived" if wcfg.queries == "key_derived" else "stamped held-out"
  log(f"[queries] wrote {len(queries)} {kind}, shuffled images to {path}")
  return {"n_queries": int(len(queries)), "path": str(path), "protocol": wcfg.queries}


def read_queries(path: str | os.PathLike) -> np.ndarray:
  """The `images` array of a queries.npz file (uint8 [Q, H, W, C])."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as f:
      if list(f.files) != ["images"]:
        raise CCDDError(f"{path} is not a queries file: it must hold one array, images")
      images = f["images"]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    hint = stages.rerun_hint(QUERIES_FILE)
    raise CCDDError(
      f"cannot read queries file {path}, it is corrupt or truncated ({e}): {hint}"
    ) from None
  if images.dtype != np.uint8 or images.ndim != 4:
    raise CCDDError(f"{path} is not a queries file: images must be uint8 [Q, H, W, C]")
  return images


# ----------------------------------------------------------------------------
# The suspect's answers.
# ----------------------------------------------------------------------------


def _read_npy(path: str) -> np.ndarray:
  try:
    values = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise CCDDError(f"cannot read predictions file {path}: {e}") from None
  if values.ndim != 1:
    raise CCDDError(f"predictions file {path} holds an array of shape {values.shape}, not 1-D")
  if values.dtype.kind not in "iu":
    raise CCDDError(
      f"predictions file {path} holds {values.dtype} values, not integer classes "
      "(save the argmax as integers)"
    )
  return values


def _read_text(path: str, max_bytes: int) -> np.ndarray:
  try:
    with open(path, "rb") as f:
      raw = f.read(max_bytes + 1)
  except OSError as e:
    raise CCDDError(f"cannot read predictions file {path}: {e.strerror or e}") from None
  if len(raw) > max_bytes:
    raise CCDDError(f"predictions file {path} is too large for one class per query")
  try:
    text = raw.decode("ascii")
  except UnicodeDecodeError:
    raise CCDDError(
      f"predictions file {path} is neither a .npy file nor text with one integer per line"
    ) from None
  values = []
  for number, line in enumerate(text.splitlines(), 1):
    token = line.strip()
    if not token:
      continue
    if not _INTEGER.fullmatch(token):
      raise CCDDError(
        f"predictions file {path}, line {number}: {token[:24]!r} is not an integer class "
        "(write one integer per line, e.g. np.savetxt(path, classes, fmt='%d'))"
      )
    values.append(int(token))
  return np.array(values, dtype=object)


def read_predictions(path: str | os.PathLike, n: int, num_classes: int) -> np.ndarray:
  """The suspect's n classes in [0, num_classes), from a .npy file or one integer per line."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      head = f.read(len(_NPY_MAGIC))
  except FileNotFoundError:
    raise CCDDError(f"predictions file {path} does not exist") from None
  except OSError as e:
    raise CCDDError(f"cannot read predictions file {path}: {e.strerror or e}") from None
  if head == _NPY_MAGIC:
    values = _read_npy(path)
  else:
    values = _read_text(path, 32 * n + 4096)
  if values.size != n:
    raise CCDDError(
      f"predictions file {path} holds {values.size} classes; {n} expected "
      f"(one per query of {QUERIES_FILE}, in its order)"
    )
  outside = np.flatnonzero((values < 0) | (values >= num_classes))
  if outside.size:
    raise CCDDError(
      f"predictions file {path}: entry {outside[0]} is class {values[outside[0]]}, "
      f"outside [0, {num_classes})"
    )
  return values.astype(np.int64)


def verify_file(
  workdir: pathlib.Path,
  predictions_file: str | os.PathLike,
  key: bytes,
  dataset: datasets.Dataset,
  patterns: tuple[np.ndarray, np.ndarray],
  wcfg: ml_collections.ConfigDict,
) -> dict:
  """Tests a suspect's answers to `workdir/queries.npz`, read from `predictions_file`.

  `patterns` is `watermark.expand_key`'s (patterns, labels) for `key`; `wcfg`
  the config's `watermark` section (queries_per_pattern, alpha). The queries
  are rebuilt from the key and the held-out split; a queries.npz in `workdir`
  that differs from them (another config or key) is refused. Writes and
  returns verification_blackbox.json's dict.
  """
  workdir, m = pathlib.Path(workdir), wcfg.queries_per_pattern
  queries_file = workdir / QUERIES_FILE
  expected, plan = query_set(key, dataset, patterns[0], wcfg)
  if queries_file.exists() and not np.array_equal(read_queries(queries_file), expected):
    raise CCDDError(
      f"{queries_file} is not the query set of this key and config "
      "(verify with the key and config that made it)"
    )
  predictions = read_predictions(predictions_file, len(expected), dataset.num_classes)
  args = (predictions, key, plan, patterns[1], dataset.num_classes, m, wcfg.alpha)
  result = verify.file_answers_result(*args)
  result["protocol"] = wcfg.queries
  result["predictions_file"] = os.fspath(predictions_file)
  write_json(workdir / RESULT_FILE, result)
  log(f"[verify] black box: {verify.verdict_line(result)}")
  return result


# ----------------------------------------------------------------------------
# The key commitment.
# ----------------------------------------------------------------------------


def read_commitment(path: str | os.PathLike) -> str:
  """The 64 lower-case hex digits of a commitment file (surrounding whitespace allowed)."""
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      raw = f.read(4097)
  except FileNotFoundError:
    raise CCDDError(f"commitment file {path} does not exist") from None
  except OSError as e:
    raise CCDDError(f"cannot read commitment file {path}: {e.strerror or e}") from None
  text = raw.strip() if len(raw) <= 4096 else b""
  if not _HEX_COMMITMENT.fullmatch(text.decode("ascii", "replace")):
    raise CCDDError(f"commitment file {path} does not hold a SHA-256 commitment as 64 hex digits")
  return text.decode("ascii").lower()


def check_commitment(
  commitment_file: str | os.PathLike | None, key_file: str | os.PathLike
) -> None:
  """Refuses (CCDDError) the key in `key_file` unless it matches the commitment; None: no check."""
  if commitment_file is None:
    return
  committed = read_commitment(commitment_file)
  key = watermark.read_key_file(key_file)
  if watermark.key_commitment(key) != committed:
    raise CCDDError(
      f"the key in {os.fspath(key_file)} (fingerprint {watermark.key_fingerprint(key)}) does "
      f"not match the commitment in {os.fspath(commitment_file)} ({committed[:16]}...)"
    )


def refuse_orphan_commitment(workdir: pathlib.Path) -> None:
  """Before a new key is made: a commitment already in `workdir` is another key's; refuse."""
  path = pathlib.Path(workdir) / COMMITMENT_FILE
  if path.exists():
    raise CCDDError(
      f"{path} commits to a key that is not there; restore that key (--key_file) "
      "or move the commitment away before making a new key"
    )


def keep_commitment(workdir: pathlib.Path, key_file: pathlib.Path) -> str:
  """Writes `workdir/owner.commitment` for the key, or checks the one there; returns it."""
  path = pathlib.Path(workdir) / COMMITMENT_FILE
  if path.exists():
    check_commitment(path, key_file)
    log(f"[keygen] {path} matches the key")
  else:
    commitment = watermark.key_commitment(watermark.read_key_file(key_file))
    if not sharding.is_writer():  # Process 0 writes it.
      return commitment
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(commitment + "\n")
    os.replace(tmp, path)
    log(f"[keygen] wrote the key's commitment to {path} (public: publish it before release)")
  return read_commitment(path)
