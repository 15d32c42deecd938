"""Every config file loads, validates and builds its model; paper values in place; the loader."""

import importlib.util
import os
import pathlib
import subprocess
import sys

from conftest import REPO
import jax
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.config import loader as config_loader
from ccdd_jax.config import paper as paper_lib
from ccdd_jax.config import validation
from ccdd_jax.method import models

NAMES = config_loader.shipped_config_names()


def test_shipped_configs_are_the_repository_configs():
  assert config_loader.shipped_configs_dir().resolve() == (REPO / "configs").resolve()
  assert NAMES == sorted(p.stem for p in (REPO / "configs").glob("*.py") if p.stem != "__init__")
  for dataset, ipc in paper_lib.MTT_SETTINGS:
    assert f"{dataset}_ipc{ipc}" in NAMES
  assert "digits" in NAMES and "cifar10_cpu" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_config_validates_and_builds_its_model(name):
  config = config_loader.load(name)
  validation.validate(config)
  side = 8 if config.data.name == "digits" else (64 if "tinyimagenet" in name else 32)
  channels = 1 if config.data.name == "digits" else 3
  net = models.build_network(config.model.name, 10, (side, side, channels), config.model)
  assert jax.tree_util.tree_leaves(net.like_params())


def test_loader_overrides_and_errors(tmp_path):
  by_name = config_loader.load("digits", ["distill.ipc=3", "eval.models=convnet,alexnet"])
  by_path = config_loader.load(str(REPO / "configs" / "digits.py"))
  assert by_name.distill.ipc == 3 and by_path.distill.ipc == 10
  assert by_name.eval.models == "convnet,alexnet"
  assert config_loader.load("configs/cifar10_ipc1.py").distill.syn_steps == 50
  with pytest.raises(CCDDError, match="no config file 'nope'.*shipped configs: cifar100_ipc1"):
    config_loader.load("nope")
  with pytest.raises(CCDDError, match=r"digits.py: unknown field .distill.nope. \(distill has b"):
    config_loader.load("digits", ["distill.nope=1"])
  with pytest.raises(CCDDError, match="cannot load config .*digits.py.*distill.ipc=ten"):
    config_loader.load("digits", ["distill.ipc=ten"])
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  raise RuntimeError('no such data set')\n")
  with pytest.raises(CCDDError, match="cannot load config .*broken.py: .no such data set"):
    config_loader.load(str(broken))


def test_paper_values():
  c = config_loader.load("cifar10_ipc10")
  assert (c.distill.syn_steps, c.distill.expert_epochs, c.distill.max_start_epoch) == (30, 2, 20)
  assert (c.distill.lr_img, c.distill.lr_lr, c.distill.lr_teacher) == (100.0, 1e-5, 0.001)
  assert c.watermark.n_patterns == 10 and c.watermark.ratio == 0.1
  t = config_loader.load("tinyimagenet_ipc50")
  assert t.model.depth == 4 and t.watermark.n_patterns == 5 and t.distill.batch_syn == 300
  assert config_loader.load("cifar100_ipc50").distill.syn_steps == 80
  # ZCA: off as in the CCDD paper; MTT's choices recorded per setting.
  assert not c.data.zca and c.data.zca_eps == 0.1
  assert [k for k, v in paper_lib.MTT_ZCA.items() if v] == [
    ("cifar10", 1),
    ("cifar10", 10),
    ("cifar100", 1),
    ("cifar100", 50),
  ]
  assert set(paper_lib.MTT_ZCA) == set(paper_lib.MTT_SETTINGS)


def test_cpu_config_is_the_paper_setting_scaled_down():
  c = config_loader.load("cifar10_cpu_paper")
  paper = paper_lib.paper_config("cifar10", 10)
  assert c.distill.ipc == paper.distill.ipc == 10
  assert (c.watermark.n_patterns, c.watermark.ratio) == (10, 0.1)
  assert c.data.name == "folder" and c.data.root.endswith("cifar10-jpeg.tar.gz")
  assert pathlib.Path(c.data.root).is_absolute()
  # The CIFAR-10 default: the same scale-down, appended, with 7 patterns (results.md 10.3).
  default = config_loader.load("cifar10_cpu")
  assert (default.watermark.n_patterns, default.distill.watermark_embedding) == (7, "appended")
  assert default.data.root == c.data.root and default.experts.to_dict() == c.experts.to_dict()


def test_invalid_config_is_a_one_line_error():
  config = config_loader.load("digits")
  config.distill.max_start_epoch = 30
  with pytest.raises(CCDDError, match="exceeds experts.epochs"):
    validation.validate(config)
  config.distill.max_start_epoch = 10
  config.experts.group_size = -1
  with pytest.raises(CCDDError, match="experts.group_size"):
    validation.validate(config)
  config.experts.group_size = 1
  config.concurrency = -2
  with pytest.raises(CCDDError, match="concurrency"):
    validation.validate(config)
  config.concurrency = 0
  config.distill.syn_steps = 0
  with pytest.raises(CCDDError, match="distill.syn_steps = 0 must be >= 1"):
    validation.validate(config)
  config.distill.syn_steps = 20
  config.model.name = "lenet"
  with pytest.raises(CCDDError, match="invalid config: unknown architecture 'lenet'"):
    validation.validate(config)
  config.model.name = "convnet"
  config.eval.models = "convnet,alexnet:batch"
  with pytest.raises(CCDDError, match="eval.models entry 'alexnet:batch': .* no norm 'batch'"):
    validation.validate(config)
  config.eval.models = "resnet18,resnet18"
  with pytest.raises(CCDDError, match="eval.models lists .resnet18. twice"):
    validation.validate(config)


@pytest.mark.slow
def test_non_editable_install_finds_its_default_config(tmp_path):
  """`pip install .` into a fresh virtualenv; the default config loads from another folder."""
  if importlib.util.find_spec("setuptools") is None:
    pytest.skip("setuptools is needed to build the wheel offline")
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  python = venv / "bin" / "python"
  site = subprocess.run(
    [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  # Dependencies come from this environment's site-packages, listed after the venv's
  # own (a path line in a .pth file), so the non-editable copy is what imports.
  deps = [p for p in sys.path if p.endswith("site-packages")]
  pathlib.Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
  install = subprocess.run(
    [
      python,
      "-m",
      "pip",
      "install",
      "--no-deps",
      "--no-build-isolation",
      "--no-cache-dir",
      "-q",
      str(REPO),
    ],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=dict(os.environ, TMPDIR=str(tmp_path)),
  )
  assert install.returncode == 0, install.stderr
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  found = subprocess.run(
    [
      python,
      "-c",
      "import ccdd_jax, ccdd_jax.configs; "
      "print(ccdd_jax.__file__); print(ccdd_jax.configs.__file__)",
    ],
    capture_output=True,
    text=True,
    cwd=elsewhere,
    env=env,
  )
  assert found.returncode == 0, found.stderr
  assert all(str(site) in line for line in found.stdout.split()), found.stdout
  run = subprocess.run(
    [python, "-m", "ccdd_jax.main", f"--workdir={elsewhere / 'w'}", "--stage=keygen"],
    capture_output=True,
    text=True,
    cwd=elsewhere,
    env=env,
    timeout=300,
  )
  assert run.returncode == 0, run.stderr
  assert (elsewhere / "w" / "owner.key").is_file()
