"""Each removal attack does what it says, and --stage=attacks runs end to end without leaking."""

import functools
import json
import shutil

from conftest import config_section
import jax
import ml_collections
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax import lists
from ccdd_jax.config import schema
from ccdd_jax.config import validation
from ccdd_jax.data import datasets as data_lib
from ccdd_jax.data import preprocess
from ccdd_jax.method import evaluate
from ccdd_jax.method import models
from ccdd_jax.method import pruning
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.run import pipeline
from ccdd_jax.run import stages
from ccdd_jax.threats import model_attacks
from ccdd_jax.threats import suite

NO_AUG = config_section("dsa", strategy="none")
KEY1, KEY2 = bytes(range(32)), bytes(range(100, 132))


@functools.cache  # One apply function per layout, so the attacks' compiled epochs are shared.
def tiny_network(arch="convnet", conv_impl="auto"):
  model = config_section("model", width=8, depth=2, conv_impl=conv_impl)
  return models.build_network(arch, 10, (8, 8, 1), model, width=4)


def random_data(num=40, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num, 8, 8, 1)).astype(np.float32)
  return {"images": images, "labels": rng.integers(0, 10, num).astype(np.int32)}


def leaves_equal(a, b) -> bool:
  return all(
    np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
  )


@pytest.mark.parametrize(
  "arch,conv_impl",
  [pytest.param("convnet", "auto", marks=pytest.mark.slow), ("convnet", "lax")],  # auto: ~7 s.
)
def test_pruned_channels_are_zero_and_the_rest_untouched(arch, conv_impl):
  net = tiny_network(arch, conv_impl)
  params = jax.device_get(net.init_params(jax.random.PRNGKey(0), 2))
  data = random_data()
  pruned = model_attacks.prune(net.apply, params, None, data, ratio=0.5)
  activations = model_attacks.mean_channel_activations(net.apply, params, data["images"])
  for s in range(2):
    one = lambda tree, s=s: jax.tree_util.tree_map(lambda x: x[s], tree)
    mask = np.asarray(pruning.prune_mask(activations[s], 0.5))
    assert mask.sum() == len(mask) // 2  # The least active half is cut.
    assert activations[s][mask == 0].max() <= activations[s][mask == 1].min()
    # The pruned network is the network with those channels zeroed.
    logits = net.apply(one(pruned), data["images"])
    masked = net.apply(one(params), data["images"], channel_mask=mask)
    np.testing.assert_allclose(logits, masked, rtol=1e-5, atol=1e-5)
    # Only the head rows that read a pruned channel changed, to exactly zero.
    kernel, before = one(pruned)["head"]["kernel"], one(params)["head"]["kernel"]
    rows = np.tile(mask, kernel.shape[0] // len(mask)) > 0
    assert np.all(kernel[~rows] == 0) and np.array_equal(kernel[rows], before[rows])
  rest = lambda tree: {k: v for k, v in tree.items() if k != "head"}
  assert leaves_equal(rest(pruned), rest(params))
  assert np.array_equal(pruned["head"]["bias"], params["head"]["bias"])


@pytest.mark.slow
def test_last_layer_fine_tuning_changes_only_the_last_layer():
  net = tiny_network()
  params = jax.device_get(net.init_params(jax.random.PRNGKey(0), 2))
  cfg = config_section("attacks", batch_size=16, lr=0.05)
  tuned = model_attacks.fine_tune(
    net.apply, params, cfg, random_data(), jax.random.PRNGKey(1), epochs=2, layers="head"
  )
  rest = lambda tree: {k: v for k, v in tree.items() if k != "head"}
  assert leaves_equal(rest(tuned), rest(params))
  for name in ("kernel", "bias"):
    assert not np.allclose(tuned["head"][name], params["head"][name])
  # All layers: the convolutions move too.
  tuned_all = model_attacks.fine_tune(
    net.apply, params, cfg, random_data(), jax.random.PRNGKey(1), epochs=2
  )
  assert not np.allclose(tuned_all["conv_0"]["kernel"], params["conv_0"]["kernel"])


def test_fine_pruning_keeps_the_pruned_channels_pruned():
  net = tiny_network()
  params = jax.device_get(net.init_params(jax.random.PRNGKey(0), 2))
  data, cfg = random_data(), config_section("attacks", batch_size=16, lr=0.05)
  pruned, keep = model_attacks.prune_with_mask(net.apply, params, data, ratio=0.5)
  tuned = model_attacks.fine_prune(
    net.apply, params, cfg, data, jax.random.PRNGKey(1), ratio=0.5, epochs=2
  )
  cut = keep["head"]["kernel"] == 0
  assert cut.any() and np.all(tuned["head"]["kernel"][cut] == 0)
  assert not np.allclose(tuned["head"]["kernel"][~cut], pruned["head"]["kernel"][~cut])
  # Each point of a path continues the same run: the last equals the single call.
  path = dict(
    model_attacks.fine_prune_path(
      net.apply, params, cfg, data, jax.random.PRNGKey(1), ratio=0.5, epochs=(1, 2)
    )
  )
  assert sorted(path) == [1, 2]
  assert leaves_equal(path[2], tuned)


# ----------------------------------------------------------------------------
# On digits: a network watermarked with KEY1, its owner's data and the attacker's.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
  """Two width-16 digits ConvNets trained on the owner's data plus KEY1's D_W (about 15 s)."""
  ds = data_lib.load_dataset(config_section("data"))
  prep = preprocess.fit_preprocessor(ds.train_images)
  net = models.build_network("convnet", 10, (8, 8, 1), config_section("model", width=16, depth=2))
  patterns, labels = watermark.expand_key(KEY1, 10, 4, 1, 10)
  wm_images, wm_labels, _ = watermark.make_watermark_set(
    ds.train_images, ds.train_labels, patterns, labels, 0.1, np.random.default_rng(0)
  )
  images = prep.apply(np.concatenate([ds.train_images, wm_images]))
  targets = np.concatenate([ds.train_labels, wm_labels])
  train = evaluate.make_networks_trainer(net.apply, NO_AUG, epochs=30, batch_size=64)
  params = jax.device_get(
    train(net.init_params(jax.random.PRNGKey(0), 2), images, targets, 0.02, jax.random.PRNGKey(1))
  )
  verifier = verify.Verifier(
    predict=evaluate.make_predictor(net.apply),
    to_inputs=prep.apply,
    key=KEY1,
    test_images=ds.test_images,
    test_labels=ds.test_labels,
    n_patterns=10,
    patch_size=4,
    num_classes=10,
    m=30,
    alpha=1e-3,
  )
  attacker = {"images": prep.apply(ds.attacker_images), "labels": ds.attacker_labels}
  return ds, net, params, verifier, attacker


@pytest.mark.slow
def test_overwriting_makes_the_second_key_verifiable(digits):
  ds, net, params, verifier, attacker = digits
  second = verifier.with_key(KEY2)
  assert all(verifier.measure(params)["verified"])
  assert not any(second.measure(params)["verified"])
  wm_images, wm_labels = model_attacks.overwriting_set(
    ds.attacker_images,
    ds.attacker_labels,
    KEY2,
    n_patterns=10,
    patch_size=4,
    num_classes=10,
    ratio=0.5,
    rng=np.random.default_rng(1),
  )
  data = {**attacker, "wm_images": verifier.to_inputs(wm_images), "wm_labels": wm_labels}
  cfg = config_section("attacks")
  overwritten = model_attacks.overwrite(
    net.apply, params, cfg, data, jax.random.PRNGKey(2), epochs=50, layers="all"
  )
  after = second.measure(overwritten)
  assert all(after["verified"]), after


@pytest.mark.slow
def test_extraction_reaches_the_teachers_accuracy(digits):
  _, net, params, verifier, attacker = digits
  cfg = config_section("attacks")
  init = net.init_params(jax.random.PRNGKey(5), 2)
  student = model_attacks.extract(
    net.apply, params, cfg, attacker, jax.random.PRNGKey(3), epochs=100, init_params=init
  )
  teacher_acc = np.mean(verifier.measure(params)["acc"])
  student_acc = np.mean(verifier.measure(student)["acc"])
  assert student_acc >= teacher_acc - 0.1, (student_acc, teacher_acc)


# ----------------------------------------------------------------------------
# Input transformations.
# ----------------------------------------------------------------------------


def smooth_images(channels):
  yy, xx = np.mgrid[0:32, 0:32]
  base = 127 + 60 * np.sin(2 * np.pi * xx / 32) * np.cos(4 * np.pi * yy / 32)  # Periodic.
  rng = np.random.default_rng(0)
  images = base[None, :, :, None] + rng.normal(0, 4, (4, 32, 32, channels))
  return np.clip(images, 0, 255).astype(np.uint8)


def high_frequency(images):
  """Mean squared discrete Laplacian away from the borders: the energy of fine detail."""
  x = images.astype(np.float64)
  lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
  return np.mean(lap[:, 4:-4, 4:-4] ** 2)


@pytest.mark.parametrize("channels", [1, 3])
def test_input_transformations_do_what_they_say(channels):
  images = smooth_images(channels)
  for name, strength in (("jpeg", 75), ("blur", 1.0), ("resize", 0.5)):
    out = model_attacks.INPUT_TRANSFORMS[name](images, strength)
    assert out.shape == images.shape and out.dtype == np.uint8, name
  change = np.abs(model_attacks.jpeg(images, 75).astype(int) - images).mean()
  assert 0 < change < 12
  assert np.abs(model_attacks.jpeg(images, 95).astype(int) - images).mean() < change
  for blurred in (model_attacks.gaussian_blur(images, 1.0), model_attacks.resize(images, 0.5)):
    assert high_frequency(blurred) < 0.3 * high_frequency(images)
  assert high_frequency(model_attacks.gaussian_blur(images, 2.0)) < high_frequency(
    model_attacks.gaussian_blur(images, 1.0)
  )
  with pytest.raises(ValueError):
    model_attacks.jpeg(images.astype(np.float32), 50)


# ----------------------------------------------------------------------------
# Config and the stage.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "field,value,message",
  [
    ("prune_ratios", "0.5,1.5", "attacks.prune_ratios"),
    ("fine_tune_epochs", "1,2.5", "attacks.fine_tune_epochs"),
    ("jpeg_qualities", "abc", "attacks.jpeg_qualities"),
    ("sets", "distilled,pirated", "attacks.sets"),
    ("num_seeds", 99, "attacks.num_seeds"),
    ("overwrite_ratio", 0.0, "attacks.overwrite_ratio"),
  ],
)
def test_bad_attack_settings_fail_in_one_line(field, value, message):
  config = schema.base_config()
  config.attacks[field] = value
  with pytest.raises(CCDDError, match=message):
    validation.validate(config)


def test_strength_lists_take_strings_and_tuples():
  assert lists.parse_list("1, 10,50", int) == (1, 10, 50)
  assert lists.parse_list((0.5, 0.9), float) == (0.5, 0.9)
  assert lists.parse_list("", float) == ()
  validation.validate(schema.base_config())  # The defaults are valid.


@pytest.mark.slow
def test_all_does_not_run_attacks(tiny_run):
  workdir, _, report = tiny_run
  assert "attacks" in stages.NAMES and "attacks" not in stages.IN_ALL
  assert not (workdir / "attacks.json").exists() and "attacks" not in report["wall_seconds"]


@pytest.mark.slow
def test_attacks_stage_end_to_end_and_the_key_stays_secret(tiny_run, tmp_path, capfd):
  workdir, config, _ = tiny_run
  run = tmp_path / "attacked"
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("trajectories"))
  config = ml_collections.ConfigDict(config.to_dict())
  a = config.attacks
  a.sets, a.num_seeds, a.fine_tune_epochs, a.prune_ratios = "distilled,real", 1, "1,2", "0.5"
  a.data_threats = False  # tests/test_data_threats.py runs them.
  a.fine_prune_ratios, a.fine_prune_epochs, a.overwrite_epochs = "0.5", 1, "1,2"
  a.extraction_epochs, a.jpeg_qualities, a.blur_sigmas, a.resize_factors = "2", "50", "1", "0.5"
  capfd.readouterr()
  report = pipeline.run(config, str(run), "attacks")
  out, err = capfd.readouterr()
  result = json.loads((run / "attacks.json").read_text())
  assert (run / "attacks.png").stat().st_size > 0
  assert set(result["sets"]) == {"distilled", "real"}
  points = result["sets"]["distilled"]
  assert [e["strength"] for e in points["fine_tune_all"]] == [1, 2]
  assert set(points) == {"before", *suite.ATTACKS}
  # Unattacked, the distilled set's network is verified and the real-data one is not (the
  # tiny run's verdicts): every attack on the first is judged, on the second has nothing to remove.
  assert points["before"]["verified"] == [True], points["before"]
  assert result["sets"]["real"]["before"]["verified"] == [False]
  for name in suite.ATTACKS:
    for e in points[name]:
      assert len(e["verified"]) == len(e["p_values"]) == 1  # attacks.num_seeds
      assert e["verdict"] in ("removed", "survived", "destroyed"), (name, e)
    for e in result["sets"]["real"][name]:
      assert e["verdict"] == "n/a", (name, e)
  assert "acc_r" in points["overwrite_last"][0]["pirate"]
  # The unattacked networks measure as --stage=verify measured them.
  verification = json.loads((run / "verification.json").read_text())["convnet"]["distilled"]
  assert points["before"]["p_values"] == verification["p_values"][:1]
  markdown = (run / "report.md").read_text()
  assert "| distilled | fine_pruning | ratio 0.5 |" in markdown
  assert "| real | none | - |" in markdown and report["attacks"]["seconds"] > 0
  assert "[attacks] distilled extraction epochs=2" in err
  # The key: in no file but the key file, and in no line printed.
  key = watermark.read_key_file(run / "owner.key")
  needles = [key, key.hex().encode(), key.hex().upper().encode()]
  for path in run.rglob("*"):
    if path.is_file() and path.name != "owner.key":
      assert not any(n in path.read_bytes() for n in needles), path
  for text in (out, err):
    assert not any(n.decode("latin-1") in text for n in needles[1:])
    assert repr(key) not in text


@pytest.mark.slow
def test_attacks_need_the_attackers_data(tiny_run, tmp_path):
  workdir, config, _ = tiny_run
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.attacker_fraction = 0.0
  run = tmp_path / "no_attacker"
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("trajectories"))
  (run / "manifest.json").unlink()  # Else the manifest refuses the changed field first.
  with pytest.raises(CCDDError, match="no attacker data: set data.attacker_fraction > 0"):
    pipeline.run(config, str(run), "attacks")
