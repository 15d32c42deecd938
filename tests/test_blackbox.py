"""Black-box verification: queries.npz out, a suspect's answers back, the key commitment.

The suspect here is a numpy softmax regression trained outside this package
on digits pixels plus D_W; the CLI verifies it from its answers alone.
"""

import hashlib
import json
import os
import subprocess
import sys

import conftest
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.config import loader as config_loader
from ccdd_jax.data import datasets
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.run import blackbox
from ccdd_jax.run import pipeline

KEY = hashlib.sha256(b"ccdd_jax tests: black-box key").digest()
SPEC_KEY = bytes(range(32))


def _features(images):
  return np.concatenate([images.reshape(len(images), -1) / 255.0, np.ones((len(images), 1))], 1)


def _softmax_regression(images, labels, steps=400, lr=2.0):
  """A linear classifier trained by full-batch gradient descent: no JAX, no ccdd_jax."""
  x, y = _features(images), np.eye(10)[labels]
  weights = np.zeros((x.shape[1], 10))
  for _ in range(steps):
    z = x @ weights
    p = np.exp(z - z.max(1, keepdims=True))
    weights -= lr * x.T @ (p / p.sum(1, keepdims=True) - y) / len(x)
  return lambda u8: (_features(u8) @ weights).argmax(1)


def run_main(*args):
  env = dict(os.environ, PYTHONPATH=str(conftest.REPO))
  return subprocess.run(
    [sys.executable, "-m", "ccdd_jax.main", *args],
    capture_output=True,
    text=True,
    env=env,
    cwd=conftest.REPO,
    timeout=300,
  )


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
  """A workdir with a fixed key (keygen keeps it), its commitment and queries.npz; two suspects."""
  workdir = tmp_path_factory.mktemp("blackbox")
  watermark.write_key_file(workdir / "owner.key", KEY)
  config = config_loader.load("digits")
  pipeline.run(config, str(workdir), "keygen")
  pipeline.run(config, str(workdir), "queries")
  ds = datasets.load_dataset(config.data)
  patterns, pattern_labels = watermark.expand_key(KEY, 10, 4, 1, 10)
  images_w, labels_w, _ = watermark.make_watermark_set(
    ds.train_images, ds.train_labels, patterns, pattern_labels, 0.1, np.random.default_rng(0)
  )
  suspects = {
    "watermarked": _softmax_regression(
      np.concatenate([ds.train_images, images_w]), np.concatenate([ds.train_labels, labels_w])
    ),
    "clean": _softmax_regression(ds.train_images, ds.train_labels),
  }
  return workdir, config, ds, suspects


def _answers(workdir, suspect):
  return suspect(np.load(workdir / "queries.npz")["images"])


def test_queries_file_holds_only_stamped_images(owner):
  workdir, config, ds, _ = owner
  with np.load(workdir / "queries.npz") as f:
    assert f.files == ["images"]
    images = f["images"]
  m, (patterns, _) = config.watermark.queries_per_pattern, watermark.expand_key(KEY, 10, 4, 1, 10)
  assert images.dtype == np.uint8 and images.shape == (10 * m, 8, 8, 1)
  # Every query carries one of the key's patterns, m each, in shuffled order.
  corner_ids = [int(np.flatnonzero((patterns == q[:4, :4]).all(axis=(1, 2, 3)))[0]) for q in images]
  assert np.bincount(corner_ids, minlength=10).tolist() == [m] * 10
  assert corner_ids != sorted(corner_ids)
  carrier_ids, pattern_ids = verify.query_plan(KEY, len(ds.test_labels), 10, m)
  assert pattern_ids.tolist() == corner_ids
  np.testing.assert_array_equal(images[:, 4:], ds.test_images[carrier_ids][:, 4:])
  raw = (workdir / "queries.npz").read_bytes()
  for needle in (KEY, KEY.hex().encode(), KEY.hex().upper().encode()):
    assert needle not in raw
  commitment = (workdir / "owner.commitment").read_text()
  assert commitment == watermark.key_commitment(KEY) + "\n"
  assert KEY.hex() not in commitment


def test_query_plan_depends_on_the_key_only_through_its_own_hash():
  a = verify.query_plan(KEY, 359, 10, 30)
  np.testing.assert_array_equal(a[0], verify.query_plan(KEY, 359, 10, 30)[0])
  assert not np.array_equal(a[0], verify.query_plan(SPEC_KEY, 359, 10, 30)[0])
  # docs/watermark-spec.md, section 8: the generator's seed for the spec's key.
  seed = hashlib.sha256(b"ccdd/queries\x00" + SPEC_KEY).hexdigest()
  assert seed == "45e3f0e63432895fd3347a05fd62e30f23df9bf062d95a9d05eb8047742da4ce"
  rng = np.random.default_rng(int(seed, 16))
  carriers, ids = verify.verification_queries(359, 10, 30, rng)
  order = rng.permutation(300)
  plan = verify.query_plan(SPEC_KEY, 359, 10, 30)
  np.testing.assert_array_equal(plan[0], carriers[order])
  np.testing.assert_array_equal(plan[1], ids[order])
  assert plan[0][:8].tolist() == [174, 314, 133, 321, 102, 328, 50, 337]
  assert plan[1][:8].tolist() == [1, 2, 8, 5, 1, 0, 7, 7]


def test_black_box_and_white_box_share_the_statistics(owner):
  """Answers regrouped by the key give `watermark.verify`'s result on the same queries."""
  _, config, ds, suspects = owner
  _, pattern_labels = watermark.expand_key(KEY, 10, 4, 1, 10)
  queries, _, _ = verify.make_queries(
    KEY, ds.test_images, watermark.expand_key(KEY, 10, 4, 1, 10)[0], 30
  )
  for suspect in suspects.values():
    black = verify.verify_predictions(
      suspect(queries), KEY, ds.test_labels, pattern_labels, num_classes=10, m=30, alpha=1e-6
    )
    # Same generator, so `verify` draws the same carriers (unshuffled).
    white = verify.verify(
      suspect,
      KEY,
      ds.test_images,
      ds.test_labels,
      n_patterns=10,
      patch_size=4,
      num_classes=10,
      m=30,
      rng=verify.query_rng(KEY),
    )
    assert black["p_value"] == white["p_conditional"]
    assert black["p_value_majority"] == white["p_majority"]
    for field in ("verified", "acc_w", "n_queries", "t_conditional", "pattern_label_hits"):
      assert black[field] == white[field], field


@pytest.mark.slow
def test_round_trip_from_a_model_trained_outside_the_package(owner, tmp_path):
  workdir, config, _, suspects = owner
  answers = tmp_path / "watermarked.npy"
  np.save(answers, _answers(workdir, suspects["watermarked"]))
  result = run_main(f"--workdir={workdir}", "--stage=verify", f"--predictions={answers}")
  assert result.returncode == 0, result.stderr
  assert "VERIFIED" in result.stdout
  on_disk = json.loads((workdir / "verification_blackbox.json").read_text())
  assert on_disk["verified"] and on_disk["p_value"] <= config.watermark.alpha
  assert on_disk["key_fingerprint"] == watermark.key_fingerprint(KEY)
  assert on_disk["n_queries"] == 300 and on_disk["alpha"] == config.watermark.alpha
  assert {"p_value_majority", "acc_w"} <= set(on_disk) and on_disk["acc_w"] > 0.3
  # The model trained without D_W, its answers as text: not verified.
  clean = tmp_path / "clean.txt"
  np.savetxt(clean, _answers(workdir, suspects["clean"]), fmt="%d")
  result = pipeline.run(config, str(workdir), "verify", predictions=str(clean))
  assert not result["verified"] and result["p_value"] > 1e-3


def test_forged_keys_are_not_verified(owner):
  """Neither suspect is verified by 20 keys it never saw (both tests at alpha = 1e-6)."""
  _, _, ds, suspects = owner
  for trial in range(20):
    key = hashlib.sha256(b"forged %d" % trial).digest()
    patterns, pattern_labels = watermark.expand_key(key, 10, 4, 1, 10)
    queries = verify.make_queries(key, ds.test_images, patterns, 30)[0]
    for suspect in suspects.values():
      r = verify.verify_predictions(
        suspect(queries), key, ds.test_labels, pattern_labels, num_classes=10, m=30, alpha=1e-6
      )
      assert not r["verified"] and r["p_value_majority"] > 1e-6


@pytest.mark.slow
@pytest.mark.parametrize(
  "content,message",
  [
    (np.zeros(299, np.int64), "holds 299 classes; 300 expected"),
    (np.full(300, 0.5), "float64 values, not integer classes"),
    (np.full(300, 10), "entry 0 is class 10, outside [0, 10)"),
    (b"\x00\xff" * 50, "neither a .npy file nor text"),
  ],
  ids=["wrong-length", "floats", "out-of-range", "unreadable"],
)
def test_bad_prediction_files_are_one_line_cli_errors(owner, tmp_path, content, message):
  workdir = owner[0]
  path = tmp_path / "answers"
  if isinstance(content, np.ndarray):
    path = tmp_path / "answers.npy"
    np.save(path, content)
  else:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
  result = run_main(f"--workdir={workdir}", "--stage=verify", f"--predictions={path}")
  assert result.returncode == 1 and "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and message in errors[0], result.stderr


@pytest.mark.parametrize(
  "write,message",
  [
    (lambda p: np.save(p, np.zeros((300, 1), np.int64)), "shape (300, 1), not 1-D"),
    (lambda p: np.save(p, np.ones(300, bool)), "bool values"),
    (lambda p: p.write_text("1\n" * 299 + "-1\n"), "entry 299 is class -1"),
    (lambda p: p.write_text("1 2\n" * 300), "'1 2' is not an integer"),
    (lambda p: p.write_text("0\n" * 299 + "3.0\n"), "line 300: '3.0' is not an integer class"),
    (lambda p: p.write_bytes(b"\x93NUMPY garbage"), "cannot read predictions file"),
    (lambda p: p.mkdir(), "cannot read predictions file"),
    (lambda p: None, "does not exist"),
  ],
)
def test_read_predictions_refuses(tmp_path, write, message):
  path = tmp_path / "answers.npy"
  write(path)
  with pytest.raises(CCDDError, match=message.replace("(", r"\(").replace(")", r"\)")):
    blackbox.read_predictions(path, 300, 10)


def test_read_predictions_accepts_npy_and_text(tmp_path):
  classes = np.arange(300) % 10
  np.save(tmp_path / "a.npy", classes.astype(np.uint8))
  (tmp_path / "a.txt").write_text("\n".join(str(c) for c in classes) + "\n\n")
  for name in ("a.npy", "a.txt"):
    out = blackbox.read_predictions(tmp_path / name, 300, 10)
    assert out.dtype == np.int64 and out.tolist() == classes.tolist()


def test_queries_of_another_key_or_config_are_refused(owner, tmp_path):
  workdir, config, ds, _ = owner
  other = tmp_path / "other"
  other.mkdir()
  watermark.write_key_file(other / "owner.key", KEY)
  patterns = watermark.expand_key(SPEC_KEY, 10, 4, 1, 10)[0]
  blackbox.write_queries(other, SPEC_KEY, ds, patterns, config.watermark)
  answers = tmp_path / "answers.npy"
  np.save(answers, np.zeros(300, np.int64))
  with pytest.raises(CCDDError, match="not the query set of this key and config"):
    pipeline.run(config, str(other), "verify", predictions=str(answers))


@pytest.mark.slow
def test_commitment(owner, tmp_path):
  workdir, config, _, _ = owner
  # docs/watermark-spec.md, section 1: the fingerprint is the commitment's prefix.
  assert watermark.key_commitment(SPEC_KEY) == (
    "15f07d5cecd7006f38a247773ae58715fc2bf62c76d33ef4746529edc4376e21"
  )
  blackbox.check_commitment(workdir / "owner.commitment", workdir / "owner.key")
  forged = tmp_path / "forged.commitment"
  forged.write_text("sha256 " + watermark.key_commitment(SPEC_KEY))
  with pytest.raises(CCDDError, match="64 hex digits"):
    blackbox.check_commitment(forged, workdir / "owner.key")
  forged.write_text(watermark.key_commitment(SPEC_KEY).upper() + "\n")
  # Through the CLI: a key that does not match the published commitment is refused.
  result = run_main(f"--workdir={workdir}", "--stage=verify", f"--commitment={forged}")
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 1 and len(errors) == 1, result.stderr
  assert "does not match the commitment" in errors[0] and KEY.hex() not in result.stderr
  # keygen keeps an existing key and checks the commitment beside it.
  (workdir / "owner.commitment").rename(tmp_path / "kept")
  forged.rename(workdir / "owner.commitment")
  try:
    with pytest.raises(CCDDError, match="does not match the commitment"):
      pipeline.run(config, str(workdir), "keygen")
  finally:
    (tmp_path / "kept").rename(workdir / "owner.commitment")
  # A commitment without its key is another key's: keygen makes no new key beside it.
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  (fresh / "owner.commitment").write_text(watermark.key_commitment(KEY) + "\n")
  with pytest.raises(CCDDError, match="commits to a key that is not there"):
    pipeline.run(config, str(fresh), "keygen")
  assert not (fresh / "owner.key").exists()
