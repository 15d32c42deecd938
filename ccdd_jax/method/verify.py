"""Stage III: verification. A suspect is queried with the key's triggers and judged by
exact tests; the paper's eq. 11 would accept a random model with probability
1 - 0.9^10 ~ 0.65, so these replace it (docs/watermark-spec.md).

  white box   `verify`: stamp held-out images with the key's patterns (m per
              pattern, drawn independently of the key's labels), ask the
              model, `decide`; `Verifier` does it for stacked networks the
              way the verify stage, the attacks and the experts' metrics do.
  black box   `make_queries` writes the stamped images in a key-seeded order
              (queries.npz); `verify_predictions` regroups a suspect's answers
              by pattern with the key alone, then `decide`.
  `decide`    both exact tests of exact_tests.py and the verdict, p <= alpha.
  key-derived `Verifier(protocol="key_derived")`: the key's patterns tiled over
              whole images with key-seeded noise (key_queries.py, spec section 9):
              no class of their own, so every answer counts.
Acc_W, the paper's watermark accuracy (`watermark_accuracy`,
`accuracy_and_acc_w`), is measured on every test image stamped with every
pattern of another class; it is reported, never tested.
"""

from collections.abc import Callable
import dataclasses
import functools
import hashlib
from typing import Any

import jax
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax.method import exact_tests
from ccdd_jax.method import key_queries
from ccdd_jax.method import watermark

QUERY_TAG = b"ccdd/queries\x00"
# How the owner queries a suspect (docs/watermark-spec.md sections 6 and 9, key_queries.py).
QUERY_PROTOCOLS = ("stamped", "key_derived")


def verification_queries(
  num_images: int, n_patterns: int, m: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Draws m carriers per pattern, independently of the key's labels.

  Returns (carrier_ids int64 [Q], pattern_ids int64 [Q]), pattern-major; m
  None means every image carries every pattern.
  """
  num_images = watermark.check_int("the number of held-out images", num_images, 1)
  n_patterns = watermark.check_int("n_patterns", n_patterns, 1)
  if m is None:
    carrier_ids = np.tile(np.arange(num_images), n_patterns)
  else:
    m = watermark.check_int("m", m, 1)
    if m > num_images:
      raise CCDDError(f"m = {m} queries per pattern but only {num_images} held-out images")
    carrier_ids = np.concatenate(
      [rng.choice(num_images, size=m, replace=False) for _ in range(n_patterns)]
    )
  pattern_ids = np.repeat(np.arange(n_patterns), carrier_ids.size // n_patterns)
  return carrier_ids.astype(np.int64), pattern_ids


def _predict_queries(
  predict_fn, images, carrier_ids, patterns, pattern_ids, num_classes, batch_size
) -> np.ndarray:
  predictions = np.empty(carrier_ids.size, np.int64)
  for start in range(0, carrier_ids.size, batch_size):
    batch = slice(start, start + batch_size)
    queries = watermark.stamp(images[carrier_ids[batch]], patterns, pattern_ids[batch])
    answer = np.asarray(predict_fn(queries))
    if answer.shape != (len(queries),) or answer.dtype.kind not in "iu":
      raise ValueError(
        f"predict_fn must return {len(queries)} integer classes "
        f"for {len(queries)} images, got {answer.dtype} "
        f"{answer.shape}"
      )
    if answer.min() < 0 or answer.max() >= num_classes:
      raise ValueError(f"predict_fn returned a class outside [0, {num_classes})")
    predictions[batch] = answer
  return predictions


def verify(
  predict_fn: Callable[[np.ndarray], np.ndarray],
  key: bytes,
  images: np.ndarray,
  labels: np.ndarray,
  *,
  n_patterns: int,
  patch_size: int,
  num_classes: int,
  m: int | None,
  alpha: float = 1e-6,
  rng: np.random.Generator,
  batch_size: int = 1024,
) -> dict:
  """Stage III: queries a suspect model with keyed triggers and tests them.

  Args:
    predict_fn: maps uint8 stamped images [B, H, W, C] to integer classes [B];
      the caller wraps normalisation and the model.
    key: the 32-byte watermark key (never put in the result).
    images: held-out uint8 images [N, H, W, C], never used in training.
    labels: their classes [N].
    n_patterns: n, the number of patterns embedded with this key.
    patch_size: the pattern side (half the image side in the paper).
    num_classes: C.
    m: queries per pattern, drawn without replacement from `images`
      independently of the key's labels; None stamps every image.
    alpha: the false-claim probability allowed; `verified` is p_conditional <=
      alpha.
    rng: draws the queries.
    batch_size: images per predict_fn call.

  Returns:
    A JSON-serialisable dict (see docs/watermark-spec.md, "Report"): the
    key's fingerprint, both tests' statistics and p-values, the decision,
    Acc_W on the queries and per-pattern lists; never the key or the labels.
  """
  images = watermark.check_uint8_images(images)
  patterns, pattern_labels = watermark.expand_key(
    key, n_patterns, patch_size, images.shape[-1], num_classes
  )
  labels = watermark.check_labels(labels, len(images), num_classes, "labels")
  batch_size = watermark.check_int("batch_size", batch_size, 1)
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  carrier_ids, pattern_ids = verification_queries(len(images), n_patterns, m, rng)
  predictions = _predict_queries(
    predict_fn, images, carrier_ids, patterns, pattern_ids, num_classes, batch_size
  )
  stats = decide(
    predictions,
    pattern_ids,
    labels[carrier_ids],
    pattern_labels,
    num_classes=num_classes,
    alpha=alpha,
  )
  return {
    "key_fingerprint": watermark.key_fingerprint(key),
    "m": None if m is None else int(m),
    **stats,
  }


def decide(
  predictions: np.ndarray,
  pattern_ids: np.ndarray,
  carrier_labels: np.ndarray,
  pattern_labels: np.ndarray,
  *,
  num_classes: int,
  alpha: float = 1e-6,
) -> dict:
  """Both exact tests and the verdict on a suspect's answers to keyed queries.

  The one place the statistics are computed, for `verify` (white box) and for
  answers read from a file (`blackbox.verify_predictions`).

  Args:
    predictions: the suspect's class for each query, integers [Q].
    pattern_ids: the pattern each query carries [Q].
    carrier_labels: each query's own class [Q]; a query predicted as its own
      class is not counted (docs/watermark-spec.md, section 6.1). None for
      key-derived queries (key_queries.py): no class, every answer counts.
    pattern_labels: the key's labels y_i [n].
    num_classes: C.
    alpha: the false-claim probability allowed; `verified` is p_conditional <=
      alpha.

  Returns:
    `verify`'s dict without `key_fingerprint` and `m`.
  """
  num_classes = watermark.check_int("num_classes", num_classes, 2)
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
  pattern_labels = np.asarray(pattern_labels)
  n_patterns = watermark.check_int("n_patterns", pattern_labels.size, 1)
  pattern_labels = watermark.check_labels(pattern_labels, n_patterns, num_classes, "pattern_labels")
  predictions, pattern_ids, carrier_labels = exact_tests.check_predictions(
    predictions, pattern_ids, n_patterns, num_classes, carrier_labels
  )
  counts = exact_tests.pattern_counts(
    predictions, pattern_ids, n_patterns, num_classes, carrier_labels=carrier_labels
  )
  matches = exact_tests.plurality_matches(counts, pattern_labels)
  label_hits = counts[np.arange(n_patterns), pattern_labels]
  if carrier_labels is None:
    eligible = np.ones(predictions.size, bool)
  else:
    eligible = carrier_labels != pattern_labels[pattern_ids]
  eligible_per_pattern = np.bincount(pattern_ids[eligible], minlength=n_patterns)
  k_majority = int(matches.sum())
  p_conditional = exact_tests.conditional_label_pvalue(counts, pattern_labels)
  return {
    "n_patterns": int(n_patterns),
    "num_classes": int(num_classes),
    "n_queries": int(predictions.size),
    "n_eligible_queries": int(eligible.sum()),
    "k_majority": k_majority,
    "p_majority": exact_tests.majority_binomial_pvalue(k_majority, n_patterns, num_classes),
    "t_conditional": int(label_hits.sum()),
    "p_conditional": p_conditional,
    "alpha": float(alpha),
    "p_floor": exact_tests.p_floor(num_classes, n_patterns),
    "verified": bool(p_conditional <= alpha),
    "acc_w": (float(label_hits.sum() / eligible.sum()) if eligible.any() else 0.0),
    "pattern_eligible_queries": [int(c) for c in eligible_per_pattern],
    "pattern_label_hits": [int(c) for c in label_hits],
    "pattern_plurality_match": [int(b) for b in matches],
  }


def verify_networks(
  predict: Callable[[Any, np.ndarray], np.ndarray],
  stacked_params: Any,
  to_inputs: Callable[[np.ndarray], np.ndarray],
  key: bytes,
  images: np.ndarray,
  labels: np.ndarray,
  rngs: list,
  **verify_kwargs,
) -> dict:
  """`verify` of each stacked network (one rng each); p-values and verdicts.

  `to_inputs` maps uint8 queries to network inputs; `verify_kwargs` are
  `verify`'s n_patterns, patch_size, num_classes, m and alpha.
  """
  runs = []
  for seed, rng in enumerate(rngs):
    one = jax.tree_util.tree_map(lambda x, s=seed: x[s : s + 1], stacked_params)
    runs.append(
      verify(
        lambda u8, p=one: predict(p, to_inputs(u8))[0],
        key,
        images,
        labels,
        rng=rng,
        **verify_kwargs,
      )
    )
  return networks_result(runs)


def networks_result(runs: list[dict]) -> dict:
  """Per-network p-values and verdicts of `decide`-shaped runs, and the runs themselves."""
  return {
    "p_values": [r["p_conditional"] for r in runs],
    "p_values_majority": [r["p_majority"] for r in runs],
    "verified": [r["verified"] for r in runs],
    "runs": runs,
  }


def accuracy_and_acc_w(
  predict: Callable[[Any, np.ndarray], np.ndarray],
  stacked_params: Any,
  test_x: np.ndarray,
  test_labels: np.ndarray,
  trigger_x: np.ndarray,
  pattern_ids: np.ndarray,
  pattern_labels: np.ndarray,
) -> tuple[list[float], list[float]]:
  """Per-network test accuracy and the paper's Acc_W on stamped test images.

  `predict` is a `make_predictor` function; `trigger_x` are the normalised
  stamped images and `pattern_ids` the pattern each carries.
  """
  preds = predict(stacked_params, test_x)
  acc = (preds == np.asarray(test_labels)[None]).mean(axis=1)
  trigger_preds = predict(stacked_params, trigger_x)
  acc_w = [watermark_accuracy(p, pattern_ids, pattern_labels) for p in trigger_preds]
  return [float(a) for a in acc], [float(a) for a in acc_w]


def watermark_accuracy(
  predictions: np.ndarray,
  pattern_ids: np.ndarray,
  pattern_labels: np.ndarray,
  carrier_labels: np.ndarray | None = None,
) -> float:
  """Acc_W: the fraction of trigger queries predicted as their pattern's label.

  With `carrier_labels`, queries whose own class is the pattern's label are
  left out (`watermark.trigger_set` never draws them).
  """
  pattern_labels = np.asarray(pattern_labels)
  num_classes = np.iinfo(np.int64).max
  predictions, pattern_ids, carrier_labels = exact_tests.check_predictions(
    predictions, pattern_ids, pattern_labels.size, num_classes, carrier_labels
  )
  targets = watermark.check_labels(
    pattern_labels, pattern_labels.size, num_classes, "pattern_labels"
  )[pattern_ids]
  if carrier_labels is not None:
    kept = carrier_labels != targets
    predictions, targets = predictions[kept], targets[kept]
  if not predictions.size:
    raise ValueError("Acc_W needs at least one trigger query")
  return float(np.mean(predictions == targets))


@dataclasses.dataclass(frozen=True)
class Verifier:
  """How the owner measures stacked networks with one key: Acc, Acc_W, the exact tests."""

  predict: Callable  # evaluate.make_predictor: (stacked params, inputs) -> classes [S, N].
  to_inputs: Callable[[np.ndarray], np.ndarray]  # uint8 pixels -> network inputs.
  key: bytes = dataclasses.field(repr=False)
  test_images: np.ndarray = dataclasses.field(repr=False)  # Held out, uint8.
  test_labels: np.ndarray = dataclasses.field(repr=False)
  n_patterns: int
  patch_size: int
  num_classes: int
  m: int | None  # Queries per pattern of the exact test (None: every test image).
  alpha: float
  query_rng: Callable[[int], np.random.Generator] = dataclasses.field(
    default=np.random.default_rng, repr=False
  )  # Network index -> the generator of its verification queries.
  protocol: str = "stamped"  # QUERY_PROTOCOLS: stamped held-out images, or key-derived ones.
  query_noise: float = 0.05  # Key-derived queries' pixel noise (key_queries.py).

  def with_key(self, key: bytes) -> "Verifier":
    """The same measurements with another key (the pirate's, for overwriting)."""
    return dataclasses.replace(self, key=key)

  @functools.cached_property
  def triggers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Acc_W's queries: every test image stamped with each pattern of another class; with
    key-derived queries, the exact test's: m noisy tilings of each pattern (every one counts)."""
    patterns, labels = watermark.expand_key(
      self.key, self.n_patterns, self.patch_size, self.test_images.shape[-1], self.num_classes
    )
    if self.protocol == "key_derived":
      m, shape = self.m or len(self.test_images), self.test_images.shape[1:]
      images, ids = key_queries.key_query_images(
        self.key, patterns, shape, m, self.query_noise, "verify"
      )
      return images, ids, labels
    images, ids = watermark.trigger_set(
      self.test_images, self.test_labels, patterns, labels, None, np.random.default_rng(0)
    )
    return images, ids, labels

  @functools.cached_property
  def _inputs(self) -> tuple[np.ndarray, np.ndarray]:
    """The network inputs of the test images and of Acc_W's triggers, made once."""
    return self.to_inputs(self.test_images), self.to_inputs(self.triggers[0])

  def _to_inputs(self, transform: Callable | None) -> Callable[[np.ndarray], np.ndarray]:
    return self.to_inputs if transform is None else lambda u8: self.to_inputs(transform(u8))

  def accuracy_and_acc_w(
    self, stacked_params: Any, transform: Callable | None = None
  ) -> tuple[list[float], list[float]]:
    """Per network: test accuracy and Acc_W; every image passes `transform` first."""
    trigger_images, trigger_ids, pattern_labels = self.triggers
    if transform is None:
      test_x, trigger_x = self._inputs
    else:
      inputs = self._to_inputs(transform)
      test_x, trigger_x = inputs(self.test_images), inputs(trigger_images)
    return accuracy_and_acc_w(
      self.predict, stacked_params, test_x, self.test_labels, trigger_x, trigger_ids, pattern_labels
    )

  def verify_networks(self, stacked_params: Any, transform: Callable | None = None) -> dict:
    """`verify_networks` of each network k with the queries of `query_rng(k)`."""
    if self.protocol == "key_derived":
      images, ids, labels = self.triggers
      answers = self.predict(stacked_params, self._to_inputs(transform)(images))
      kw, m = {"num_classes": self.num_classes, "alpha": self.alpha}, len(ids) // len(labels)
      return networks_result([{"m": m, **decide(a, ids, None, labels, **kw)} for a in answers])
    count = jax.tree_util.tree_leaves(stacked_params)[0].shape[0]
    return verify_networks(
      self.predict,
      stacked_params,
      self._to_inputs(transform),
      self.key,
      self.test_images,
      self.test_labels,
      [self.query_rng(index) for index in range(count)],
      n_patterns=self.n_patterns,
      patch_size=self.patch_size,
      num_classes=self.num_classes,
      m=self.m,
      alpha=self.alpha,
    )

  def measure(self, stacked_params: Any, transform: Callable | None = None) -> dict:
    """Per network: Acc, Acc_W, both p-values, verified; queries pass `transform` first."""
    acc, acc_w = self.accuracy_and_acc_w(stacked_params, transform)
    result = self.verify_networks(stacked_params, transform)
    return {
      "acc": acc,
      "acc_w": acc_w,
      "p_values": result["p_values"],
      "p_values_majority": result["p_values_majority"],
      "verified": result["verified"],
    }


def query_rng(key: bytes) -> np.random.Generator:
  """The generator that picks and shuffles the queries: seeded by SHA-256(QUERY_TAG‖key)."""
  watermark.key_fingerprint(key)  # Checks it is a 32-byte key.
  digest = hashlib.sha256(QUERY_TAG + bytes(key)).digest()
  return np.random.default_rng(int.from_bytes(digest, "big"))


def query_plan(
  key: bytes, num_images: int, n_patterns: int, m: int | None
) -> tuple[np.ndarray, np.ndarray]:
  """(carrier_ids, pattern_ids) of the queries in file order, from the key alone.

  `verification_queries` (m carriers per pattern, drawn
  independently of the labels) with `query_rng(key)`, then a permutation
  drawn from the same generator.
  """
  rng = query_rng(key)
  carrier_ids, pattern_ids = verification_queries(num_images, n_patterns, m, rng)
  order = rng.permutation(carrier_ids.size)
  return carrier_ids[order], pattern_ids[order]


def make_queries(
  key: bytes, images: np.ndarray, patterns: np.ndarray, m: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(queries uint8 [Q, H, W, C], carrier_ids, pattern_ids): held-out `images` stamped, shuffled."""
  carrier_ids, pattern_ids = query_plan(key, len(images), len(patterns), m)
  return watermark.stamp(images[carrier_ids], patterns, pattern_ids), carrier_ids, pattern_ids


def verify_predictions(
  predictions: np.ndarray,
  key: bytes,
  labels: np.ndarray,
  pattern_labels: np.ndarray,
  *,
  num_classes: int,
  m: int | None,
  alpha: float,
) -> dict:
  """Regroups answers to `make_queries(key, ...)` by pattern with the key; `decide`.

  `labels` are the held-out images' classes (the images the queries were
  stamped on); `pattern_labels` the key's y_i. Returns verification_blackbox.json's
  dict: verified, p_value (the conditional test), p_value_majority, acc_w,
  n_queries, alpha, key_fingerprint, m, then the rest of `decide`'s fields.
  """
  labels = np.asarray(labels)
  carrier_ids, pattern_ids = query_plan(key, len(labels), len(pattern_labels), m)
  plan = (pattern_ids, labels[carrier_ids])
  return file_answers_result(predictions, key, plan, pattern_labels, num_classes, m, alpha)


def file_answers_result(
  predictions: np.ndarray,
  key: bytes,
  plan: tuple[np.ndarray, np.ndarray | None],
  pattern_labels: np.ndarray,
  num_classes: int,
  m: int | None,
  alpha: float,
) -> dict:
  """`decide` on answers in file order, `plan` = (pattern_ids, the queries' own classes or
  None for key-derived queries) in that order; verification_blackbox.json's dict."""
  pattern_ids, carrier_labels = plan
  predictions = np.asarray(predictions)
  if predictions.shape != pattern_ids.shape:
    raise ValueError(f"{pattern_ids.size} predictions expected, got shape {predictions.shape}")
  stats = decide(
    predictions,
    pattern_ids,
    carrier_labels,
    pattern_labels,
    num_classes=num_classes,
    alpha=alpha,
  )
  return {
    "verified": stats.pop("verified"),
    "p_value": stats.pop("p_conditional"),
    "p_value_majority": stats.pop("p_majority"),
    "acc_w": stats.pop("acc_w"),
    "n_queries": stats.pop("n_queries"),
    "alpha": stats.pop("alpha"),
    "key_fingerprint": watermark.key_fingerprint(key),
    "m": None if m is None else int(m),
    **stats,
  }


def verdict_line(result: dict) -> str:
  """One line for people: the verdict of a `verify_predictions` result."""
  verdict = "VERIFIED" if result["verified"] else "not verified"
  return (
    f"{verdict}: key {result['key_fingerprint']}, p = {result['p_value']:.3g} "
    f"(alpha = {result['alpha']:g}; plurality test p = {result['p_value_majority']:.3g}), "
    f"Acc_W {100 * result['acc_w']:.1f}% over {result['n_queries']} queries"
  )
