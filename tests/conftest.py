"""Shared fixtures: tiny configs so jit compilation on 2 CPU cores stays cheap."""

import atexit
import hashlib
import os
import pathlib
import shutil
import tempfile

import jax
import pytest

from ccdd_jax.config import loader as config_loader
from ccdd_jax.config import schema
from ccdd_jax.method import watermark

REPO = pathlib.Path(__file__).resolve().parent.parent


def _share_compiled_programs():
  """One persistent compilation cache for the session, its xdist workers and their children.

  Many tests compile the same programs (the tiny pipeline in-process and through
  the CLI); loading them back instead of recompiling saves about a quarter of the
  suite's time on 2 CPU cores. A fresh directory each session, removed at exit;
  pytest-xdist's workers inherit it from the controller, which loads this module first.
  """
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    directory = tempfile.mkdtemp(prefix="ccdd_jax_test_cache_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


_share_compiled_programs()


config_section = schema.section  # Tests build configs from the real schema.


# The tiny run's config: the matching embedding exercises every expert kind and both
# distillations (the default's "appended" embedding has its own tiny run in test_appended.py).
TINY_BASE = "digits_matching"


# The tiny runs' sizes as loader overrides: tiny_config()'s, and the tiny runs of other configs
# (each adds its own distill.ipc and embedding fields). 200 evaluation epochs on the 60 images
# and the digits' 30 queries per pattern: both networks trained on the tiny run's distilled set
# are verified (p about 1e-10 over several keys, alpha 1e-6); at 4 epochs and 10 queries none was.
TINY_SIZES = (
  "model.width=8",
  "experts.num_experts=2",
  "experts.epochs=3",
  "distill.iterations=4",
  "distill.syn_steps=3",
  "distill.max_start_epoch=1",
  "eval.num_seeds=2",
  "eval.epochs=200",
  "eval.real_epochs=2",
  "eval.real_lr=0.1",
  "watermark.queries_per_pattern=30",
)


def tiny_config():
  """The digits_matching config scaled down to seconds."""
  return config_loader.load(
    TINY_BASE,
    [
      *TINY_SIZES,
      "experts.fp_normal_last_epochs=1",  # The default's 5 exceed 3 epochs.
      "distill.ipc=2",
      "distill.triggers_per_pattern=0",  # ipc 2 cannot hold a random key's slots.
    ],
  )


# The tiny runs' key (keygen keeps a key it finds): a failing verdict replays exactly.
TINY_KEY = hashlib.sha256(b"ccdd_jax tests: the tiny run's key").digest()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """One whole tiny pipeline run with TINY_KEY, shared by the tests that inspect its outputs."""
  from ccdd_jax.run import pipeline  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp("tiny_run")
  watermark.write_key_file(workdir / "owner.key", TINY_KEY)
  config = tiny_config()
  report = pipeline.run(config, str(workdir), "all")
  return workdir, config, report
