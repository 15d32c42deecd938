"""The workdir's layout: where each stage's outputs live, and the distilled sets' files.

Which stage writes which entry: stages.py's table.

owner.key                       the secret key (mode 0600; --key_file elsewhere)
owner.commitment                its SHA-256 commitment, public (blackbox.py)
queries.npz                     stamped queries for a black-box suspect (blackbox.py)
verification_blackbox.json      the verdict on a suspect's answers (verify --predictions)
trajectories/<kind>/NNNN/       experts (checkpoints.py)
trajectories/flat/<kind>.npy    the file trajectory store, if used (trajectory_store.py)
<set>.npz                       a distilled set: images, labels, lr, preprocessing
models/<architecture>/<set>/    evaluated networks (checkpoints.py)
attacks.json, attacks.png       --stage=attacks (threats/suite.py, attack_plots.write_attacks)
attacks_data.png                its attacks on the distilled data (threats/data_suite.py)
*.json, report.md, *.png        figures and pictures (reporting.py)
manifest.json                   the config and key the outputs were made with (manifest.py)
resume/<stage>/                 in-progress state of experts, distill, evaluate (resume.py)
tensorboard/<run>/              TensorBoard event files of each stage (tensorboard.py)
run.lock                        the running run's host, pid and start (lock.py; not an output)
"""

import os
import pathlib
import shutil
import zipfile

import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.data import preprocess
from ccdd_jax.devices import sharding
from ccdd_jax.run import stages


def prepare(workdir: str | os.PathLike) -> pathlib.Path:
  """Creates the workdir, or fails in one line when it cannot be written (process 0 only)."""
  path = pathlib.Path(workdir)
  if not sharding.is_writer():
    return path  # The others read it after pipeline.run's first barrier.
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise CCDDError(f"cannot create workdir {path}: {e.strerror}") from e
  if not os.access(path, os.W_OK):
    raise CCDDError(f"workdir {path} is not writable")
  return path


def clear_outputs(workdir: pathlib.Path) -> list[str]:
  """Removes every stage output (stages.OUTPUTS); keeps the key and its commitment."""
  removed = []
  for name in stages.OUTPUTS:
    path = pathlib.Path(workdir) / name
    if path.is_dir():
      shutil.rmtree(path)
    elif path.exists():
      path.unlink()
    else:
      continue
    removed.append(name)
  return removed


def resume_dir(workdir: pathlib.Path, stage: str) -> pathlib.Path:
  """Where a stage keeps its in-progress state (resume.py)."""
  return pathlib.Path(workdir) / "resume" / stage


def trajectories_dir(workdir: pathlib.Path) -> pathlib.Path:
  """The root of the experts' trajectories."""
  return pathlib.Path(workdir) / "trajectories"


def networks_dir(workdir: pathlib.Path, arch: str, name: str) -> pathlib.Path:
  """Where the evaluated networks of one architecture and set are saved."""
  return pathlib.Path(workdir) / "models" / arch.replace(":", "_") / name


def save_distilled(
  workdir: pathlib.Path,
  name: str,
  images: np.ndarray,
  labels: np.ndarray,
  lr: float,
  from_trigger: np.ndarray,
  losses: np.ndarray,
  preprocessor: preprocess.Preprocessor,
  label_logits: np.ndarray | None = None,
) -> pathlib.Path:
  """Writes `<name>.npz` atomically: a kill leaves the old file or the new one, never half.

  It holds the network inputs (`images`), their [0, 1] `pixels`, hard
  `labels`, the learned `lr`, the D_W-seeded slots (`from_trigger`), eq. 10's
  history (`losses`), the input transform (`Preprocessor.as_arrays`) and,
  with distill.soft_labels, the learned `label_logits` [N, K] (train on their
  softmax).
  """
  path = pathlib.Path(workdir) / f"{name}.npz"
  if not sharding.is_writer():  # Process 0 writes; the others computed the same set.
    sharding.barrier(f"ccdd saved {name}")
    return path
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(tmp, "wb") as f:
    np.savez(
      f,
      images=images,
      labels=labels,
      lr=np.float32(lr),
      from_trigger=from_trigger,
      losses=losses,
      pixels=preprocessor.to_pixels(images),
      **preprocessor.as_arrays(),
      **({} if label_logits is None else {"label_logits": np.asarray(label_logits, np.float32)}),
    )
  os.replace(tmp, path)
  sharding.barrier(f"ccdd saved {name}")  # Read back at once (the "appended" set, the digest).
  return path


def load_distilled(workdir: pathlib.Path, name: str) -> dict:
  """The arrays of a distilled set written by the distill stage."""
  path = pathlib.Path(workdir) / f"{name}.npz"
  if not path.is_file():
    raise CCDDError(f"no distilled set at {path}: run --stage=distill first")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise CCDDError(
      f"cannot read {path}, it is corrupt or truncated ({reason}): {stages.rerun_hint(path.name)}"
    ) from None
