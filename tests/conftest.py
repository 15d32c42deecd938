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
  """One persistent compilation cache for the session and the processes it starts.

  Many tests compile the same programs (the tiny pipeline in-process and through
  the CLI); loading them back instead of recompiling saves about a quarter of the
  suite's time on 2 CPU cores. A fresh directory each session, removed at exit.
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


def tiny_config():
  """The digits_matching config scaled down to seconds."""
  config = config_loader.load(TINY_BASE)
  config.model.width = 8
  config.experts.num_experts = 2
  config.experts.epochs = 3
  config.experts.fp_normal_last_epochs = 1  # The default's 5 exceed 3 epochs.
  config.distill.iterations = 4
  config.distill.syn_steps = 3
  config.distill.max_start_epoch = 1
  config.distill.ipc = 2
  config.eval.num_seeds = 2
  # 200 epochs on the 60 images and the digits' 30 queries per pattern: both networks
  # trained on the distilled set are verified (p about 1e-10 over several keys, alpha
  # 1e-6); at 4 epochs and 10 queries none was.
  config.eval.epochs = 200
  config.eval.real_epochs = 2
  config.eval.real_lr = 0.1
  config.watermark.queries_per_pattern = 30
  config.distill.triggers_per_pattern = 0  # ipc 2 cannot hold a random key's slots.
  return config


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
