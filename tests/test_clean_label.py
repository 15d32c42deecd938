"""Key-derived queries and the "clean_label" embedding (crafting within an l_inf ball)."""

import hashlib
import types

import conftest
from conftest import config_section
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_distill import enable_x64

from ccdd_jax import CCDDError
from ccdd_jax import Preempted
from ccdd_jax.config import loader as config_loader
from ccdd_jax.config import validation
from ccdd_jax.data import datasets
from ccdd_jax.method import crafting
from ccdd_jax.method import key_queries
from ccdd_jax.method import models
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.run import blackbox
from ccdd_jax.run import context
from ccdd_jax.run import pipeline
from ccdd_jax.run import reporting
from ccdd_jax.run import resume
from ccdd_jax.run import sets
from ccdd_jax.run import workdir as workdir_lib

KEY = hashlib.sha256(b"ccdd_jax tests: key-derived queries").digest()
NO_AUG = config_section("dsa", strategy="none")


def test_key_queries_are_the_tiled_pattern_plus_the_purposes_own_noise():
  patterns, _ = watermark.expand_key(KEY, 3, 4, 1, 10)
  plain, ids = key_queries.key_query_images(KEY, patterns, (8, 8, 1), 5, 0.0, "verify")
  assert plain.shape == (15, 8, 8, 1) and plain.dtype == np.uint8
  np.testing.assert_array_equal(ids, np.repeat(np.arange(3), 5))
  for i in range(3):  # Without noise: the pattern repeated over each 4x4 quarter.
    for r, c in ((0, 0), (0, 4), (4, 0), (4, 4)):
      np.testing.assert_array_equal(plain[5 * i, r : r + 4, c : c + 4], patterns[i])
  noisy, _ = key_queries.key_query_images(KEY, patterns, (8, 8, 1), 5, 0.05, "verify")
  again, _ = key_queries.key_query_images(KEY, patterns, (8, 8, 1), 5, 0.05, "verify")
  craft, _ = key_queries.key_query_images(KEY, patterns, (8, 8, 1), 5, 0.05, "craft")
  other, _ = key_queries.key_query_images(bytes(32), patterns, (8, 8, 1), 5, 0.05, "verify")
  np.testing.assert_array_equal(noisy, again)  # The key alone reproduces them.
  for different in (craft, other):  # Disjoint draws per purpose and per key.
    assert np.mean(different != noisy) > 0.5
  # Noise of std 0.05 * 255 around the tile (clipped at 0 and 255).
  spread = noisy.astype(float) - plain.astype(float)
  assert 8 < spread[(plain > 40) & (plain < 215)].std() < 18
  with pytest.raises(ValueError, match="purpose"):
    key_queries.key_query_images(KEY, patterns, (8, 8, 1), 5, 0.05, "train")


def test_the_spec_test_vector():
  """docs/watermark-spec.md section 9.1's test vector, byte for byte."""
  key = bytes(range(32))
  patterns, _ = watermark.expand_key(key, 10, 4, 1, 10)
  tiles = key_queries.tiled_patterns(patterns, (8, 8, 1))
  assert tiles[0, 0, :, 0].tolist() == [162, 114, 205, 16, 162, 114, 205, 16]
  check, _ = key_queries.key_query_images(key, patterns, (8, 8, 1), 30, 0.05, "verify")
  assert check[0, 0, :, 0].tolist() == [178, 115, 181, 29, 164, 129, 235, 25]
  craft, _ = key_queries.key_query_images(key, patterns, (8, 8, 1), 30, 0.05, "craft")
  assert craft[0, 0, :, 0].tolist() == [149, 105, 203, 43, 143, 118, 214, 11]
  ds = datasets.load_dataset(config_loader.load("digits").data)
  wcfg = config_section("watermark", queries="key_derived", queries_per_pattern=30)
  _, (pattern_ids, _) = blackbox.query_set(key, ds, patterns, wcfg)
  assert pattern_ids[:8].tolist() == [2, 0, 5, 3, 2, 3, 2, 9]


def test_key_derived_answers_all_count_in_the_exact_test():
  labels = np.array([3, 7, 1, 0, 5, 5, 2, 8, 4, 6])
  ids = np.repeat(np.arange(10), 10)
  hits = labels[ids].copy()
  hits[::5] = 9  # 8 of 10 answers per pattern name y_i.
  result = verify.decide(hits, ids, None, labels, num_classes=10, alpha=1e-6)
  assert result["n_eligible_queries"] == 100 and result["t_conditional"] == 80
  assert result["acc_w"] == pytest.approx(0.8) and result["verified"]
  # A suspect that answers one class whatever the pattern is never verified.
  constant = verify.decide(np.full(100, 3), ids, None, labels, num_classes=10, alpha=1e-6)
  assert constant["p_conditional"] > 0.05 and not constant["verified"]


def test_key_derived_verifier_and_black_box_agree():
  """The white-box Verifier and the file path give the same p-value on the same answers."""
  ds = datasets.load_dataset(config_loader.load("digits").data)
  patterns, labels = watermark.expand_key(KEY, 10, 4, 1, 10)
  wcfg = config_section("watermark", queries="key_derived", queries_per_pattern=30)
  images, plan = blackbox.query_set(KEY, ds, patterns, wcfg)
  assert plan[1] is None and len(images) == 300
  pattern_of = {images[j].tobytes(): plan[0][j] for j in range(len(images))}
  # A suspect that learnt the watermark for 8 of the 10 patterns.
  answer = lambda u8: np.array([
    labels[p] if p < 8 else 0 for p in (pattern_of.get(x.tobytes(), 9) for x in u8)
  ])  # fmt: skip
  v = verify.Verifier(
    predict=lambda params, x: answer(x)[None],
    to_inputs=lambda u8: u8,
    key=KEY,
    test_images=ds.test_images,
    test_labels=ds.test_labels,
    n_patterns=10,
    patch_size=4,
    num_classes=10,
    m=30,
    alpha=1e-6,
    protocol="key_derived",
  )
  white = v.verify_networks({"w": np.zeros((1, 1))})
  black = verify.file_answers_result(answer(images), KEY, plan, labels, 10, 30, 1e-6)
  assert white["verified"] == [True] and black["verified"]
  assert white["p_values"][0] == black["p_value"]
  acc_w = v.accuracy_and_acc_w({"w": np.zeros((1, 1))})[1][0]  # Over every key query.
  assert acc_w == pytest.approx((240 + 30 * np.sum(labels[8:] == 0)) / 300)


def _tiny_crafting_problem(dtype, remat="auto"):
  net = models.build_network("convnet", 3, (4, 4, 1), config_section("model", width=4, depth=1))
  init = jax.tree_util.tree_map(
    lambda p: p[0].astype(dtype), net.init_params(jax.random.PRNGKey(0), 1)
  )
  key = jax.random.PRNGKey(1)
  x0 = jax.random.normal(key, (6, 4, 4, 1), dtype)
  data = (
    x0,
    jnp.array([0, 0, 1, 1, 2, 2]),
    jnp.asarray(0.05, dtype),
    jax.random.normal(jax.random.fold_in(key, 1), (4, 4, 4, 1), dtype),
    jnp.array([2, 2, 0, 1]),
    jax.random.normal(jax.random.fold_in(key, 2), (9, 4, 4, 1), dtype),
    jnp.arange(9) % 3,
  )
  d = config_section(
    "distill", craft_epochs=3, craft_clean_batch=5, craft_clean_weight=0.5, remat=remat
  )
  e = config_section("eval", batch_size=4)
  objective = crafting.make_objective(net.apply, NO_AUG, e, d)
  return objective, init, data, d


@pytest.mark.slow
def test_crafting_gradient_matches_finite_differences():
  """The gradient through a whole (3-epoch, momentum, weight decay) training of a fresh network."""
  with enable_x64():
    objective, init, data, _ = _tiny_crafting_problem(jnp.float64)
    rng = jax.random.PRNGKey(3)
    f = lambda delta: objective(delta, *data[:3], init, rng, *data[3:])[0]
    delta = 0.1 * jax.random.normal(jax.random.PRNGKey(4), data[0].shape, jnp.float64)
    grad = jax.grad(f)(delta)
    assert float(jnp.abs(grad).max()) > 1e-6
    eps = 1e-5
    for idx in [(0, 0, 0, 0), (2, 1, 3, 0), (5, 3, 3, 0)]:
      bump = jnp.zeros_like(delta).at[idx].set(eps)
      fd = (f(delta + bump) - f(delta - bump)) / (2 * eps)
      np.testing.assert_allclose(grad[idx], fd, rtol=1e-4, atol=1e-9)


def test_crafting_gradient_does_not_depend_on_remat():
  """distill.remat sets what the unrolled training's backward pass stores, not the gradient."""

  def gradient(remat):
    objective, init, data, _ = _tiny_crafting_problem(jnp.float32, remat)
    loss = lambda delta: objective(delta, *data[:3], init, jax.random.PRNGKey(3), *data[3:])[0]
    return np.asarray(jax.grad(loss)(jnp.full_like(data[0], 0.05)))

  grads = {remat: gradient(remat) for remat in ("none", "full", "nested")}
  assert np.abs(grads["none"]).max() > 1e-4
  for remat in ("full", "nested"):
    np.testing.assert_allclose(grads[remat], grads["none"], rtol=1e-4, atol=1e-6, err_msg=remat)


def test_crafting_stays_in_the_ball_and_resumes_bit_for_bit(tmp_path):
  objective, init, data, d = _tiny_crafting_problem(jnp.float32)
  d.update(craft_iterations=4, craft_lr=0.3, checkpoint_every=0)
  init_fn = lambda k: init
  eps = np.float32(0.25)
  images, history = crafting.craft(d, objective, init_fn, data, eps, jax.random.PRNGKey(7))
  moved = np.abs(images - np.asarray(data[0]))
  assert history.shape == (4, crafting.HISTORY_COLUMNS)
  assert moved.max() <= eps + 1e-6 and moved.max() > 0.9 * eps  # 4 steps of 0.3 reach it.
  stops = iter([False, True])
  store = resume.DistillStore(tmp_path / "craft", crafting.HISTORY_COLUMNS)
  with pytest.raises(Preempted, match="at crafting iteration 2 of 4"):
    crafting.craft(
      d, objective, init_fn, data, eps, jax.random.PRNGKey(7), store=store,
      should_stop=lambda: next(stops),
    )  # fmt: skip
  assert store.latest() == 2
  resumed, history2 = crafting.craft(
    d, objective, init_fn, data, eps, jax.random.PRNGKey(7), store=store
  )
  np.testing.assert_array_equal(resumed, images)
  np.testing.assert_array_equal(history2, history)
  with pytest.raises(CCDDError, match="another seed"):
    crafting.craft(d, objective, init_fn, data, eps, jax.random.PRNGKey(8), store=store)


def test_crafting_takes_the_architectures_in_turn():
  """Tuples of objectives and init_fns (distill.craft_models): iteration t uses entry t mod k."""
  objective, init, data, d = _tiny_crafting_problem(jnp.float32)
  d.update(craft_iterations=5, craft_lr=0.1, checkpoint_every=0)
  calls = []
  init_fn = lambda name: lambda k: calls.append(name) or init
  key, eps = jax.random.PRNGKey(7), np.float32(0.25)
  images, history = crafting.craft(
    d, (objective, objective), (init_fn("a"), init_fn("b")), data, eps, key
  )
  assert calls == ["a", "b", "a", "b", "a"] and history.shape == (5, crafting.HISTORY_COLUMNS)
  single, _ = crafting.craft(d, objective, init_fn("a"), data, eps, key)
  np.testing.assert_array_equal(images, single)  # The same network twice: the same result.
  with pytest.raises(ValueError, match="2 objectives for 1 init_fns"):
    crafting.craft(d, (objective, objective), (init_fn("a"),), data, eps, key)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"watermark.queries": "stamped"}, "set watermark.queries=key_derived"),
    ({"data.zca": True}, "set data.zca=False"),
    ({"distill.craft_eps": 0.0}, "craft_eps"),
    ({"watermark.queries": "both"}, "watermark.queries = 'both'"),
    ({"distill.craft_models": "convnet,convnet:batch"}, "distill.craft_models entry"),
    ({"distill.craft_models": "convnet,convnet"}, "distill.craft_models lists"),
    ({"distill.craft_augmentations": "crop,blur"}, "distill.craft_augmentations entry 'blur'"),
    ({"distill.craft_augmentations": "none,crop,"}, None),
    ({"distill.craft_augmentations": "crop,none,crop"}, "craft_augmentations lists 'crop' twice"),
  ],
)
def test_clean_label_config_errors_are_one_line(overrides, message):
  config = config_loader.load("digits")
  config.distill.watermark_embedding = "clean_label"
  config.watermark.queries = "key_derived"
  for name, value in overrides.items():
    section, field = name.split(".")
    config[section][field] = value
  if message is None:  # A valid value.
    validation.validate(config)
    return
  with pytest.raises(CCDDError, match=message) as err:
    validation.validate(config)
  assert "\n" not in str(err.value)


def test_crafting_turns_pair_each_architecture_with_each_augmentation():
  """Two architectures and three DSA strategies: six turns, t -> (arch t mod 2, DSA t mod 3)."""
  config = config_loader.load("digits_clean_label")
  config.distill.craft_models = "convnet,convnet:none"
  config.distill.craft_augmentations = "none,crop,color"
  initialised = []

  def network(arch):
    init = lambda k, count: initialised.append(arch) or {"w": np.zeros((count, 1))}
    return types.SimpleNamespace(arch=arch, apply=lambda p, x: x, init_params=init)

  ctx = types.SimpleNamespace(config=config, network=network)
  objectives, init_fns, description = sets.crafting_turns(ctx)
  assert len(objectives) == len(init_fns) == 6
  assert [f(None)["w"].shape for f in init_fns] == [(1,)] * 6  # One network, unstacked.
  assert initialised == ["convnet", "convnet:none"] * 3
  assert description.split(", ") == [
    f"{arch} with DSA {dsa}"
    for arch, dsa in [
      ("convnet", "none"),
      ("convnet:none", "crop"),
      ("convnet", "color"),
      ("convnet:none", "none"),
      ("convnet", "crop"),
      ("convnet:none", "color"),
    ]
  ]
  config.distill.craft_augmentations = ""
  assert sets.crafting_turns(ctx)[2] == "convnet, convnet:none"  # dsa.strategy alone.


# conftest.tiny_config()'s sizes over the digits config, with the "clean_label" embedding.
# eps 1 (a budget a real run would not use) and 150 crafting iterations through 200-epoch
# trainings let 30 images of a width-8 network carry the watermark in about a minute (both
# networks verified, p about 3e-9; at IPC 2 and clean weight 1, one of two, p 1.7e-5).
TINY_CLEAN_LABEL = (
  *conftest.TINY_SIZES,
  "distill.ipc=3",
  "distill.watermark_embedding=clean_label",
  "distill.craft_clean_weight=0.5",
  "distill.craft_eps=1.0",
  "distill.craft_lr=0.1",
  "distill.craft_iterations=150",
  "watermark.queries=key_derived",
)


@pytest.mark.slow
def test_tiny_clean_label_run_verifies_and_keeps_every_label(tmp_path):
  config = config_loader.load("digits", list(TINY_CLEAN_LABEL))
  watermark.write_key_file(tmp_path / "owner.key", conftest.TINY_KEY)
  report = pipeline.run(config, str(tmp_path), "all")
  crafted = workdir_lib.load_distilled(tmp_path, "distilled")
  clean = workdir_lib.load_distilled(tmp_path, "clean_distilled")
  np.testing.assert_array_equal(crafted["labels"], clean["labels"])  # No label changes.
  assert crafted["images"].shape == clean["images"].shape  # No extra image.
  moved = np.abs(crafted["pixels"] - clean["pixels"])
  crafting_entry = reporting.read_json(tmp_path / "distill.json")["distilled"]["crafting"]
  assert moved.max() <= crafting_entry["max_pixel_change"] <= config.distill.craft_eps + 1e-5
  assert moved.mean() > 0.05
  assert report["distilled"]["verified"] == [True, True], report["distilled"]["p_values"]
  assert report["clean_distilled"]["verified"] == [False, False]
  assert report["real"]["verified"] == [False, False]
  # The suspect's operator answers queries.npz (key-derived images) with a model of its own:
  # here the run's first network; the answers verify with the key alone.
  queries = blackbox.read_queries(tmp_path / "queries.npz")
  assert queries.shape == (300, 8, 8, 1)
  ctx = context.Context(config, tmp_path, tmp_path / "owner.key")
  params = ctx.restore_networks("distilled")
  answers = ctx.predictor(ctx.net.apply)(params, ctx.preprocess.apply(queries))[0]
  np.savetxt(tmp_path / "answers.txt", answers, fmt="%d")
  result = pipeline.run(config, str(tmp_path), "verify", predictions=str(tmp_path / "answers.txt"))
  assert result["verified"] and result["protocol"] == "key_derived"
  assert result["p_value"] == report["distilled"]["p_values"][0]
