"""On-disk .npz caches of derived arrays: decoded image files and ZCA fits.

A cache file holds named numpy arrays; its name carries a hash of everything
the arrays were derived from, with CACHE_VERSION in the hash so that a change
of format starts fresh entries. A cache is only a speed-up: a missing or
unreadable file reads as absent, and a cache dir that cannot be written is
skipped silently.
"""

from collections.abc import Mapping
import os

import numpy as np

CACHE_VERSION = 1  # Part of every cache key: bump it to invalidate old entries.


def default_cache_dir() -> str:
  """~/.cache/ccdd_jax, honouring XDG_CACHE_HOME."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ccdd_jax")


def read_cache(path: str) -> dict | None:
  """The arrays of a cache file, or None when absent or unreadable."""
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, KeyError):
    return None


def write_cache(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """Writes a cache file atomically; an unwritable cache dir is not an error."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except OSError:
    pass
