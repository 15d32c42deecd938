"""The threat suite of --stage=attacks: every attack in attacks.py, at several strengths, on
the networks trained on each set, each attacked network judged by the owner's exact test.

The protocol follows the watermark-robustness literature (WRT, Lukas et al.
2022, "SoK: How Robust is Image Classification Deep Neural Network
Watermarking?"): the attacker holds clean data disjoint from everything the
owner trained on (`data.attacker_fraction` of each training class, held out
by data.py); and a removal only counts as successful if verification fails
while test accuracy drops by less than `MAX_ACC_DROP` (5 points), since a
destroyed model is no theft. The CCDD paper's Table 2 (FT, FP, NP) and
Table 3 (overwriting with another key, last layer, 10/50/100 epochs) report
Acc_W only; here every point also carries Acc, the exact test's p-values
and verdict per network, and for overwriting the new key's Acc_R and test.

Verdict of one (attack, strength) on one set: among the networks verified
before the attack, each is "survived" (still verified), "removed" (not
verified, Acc down < 5 points) or "destroyed" (not verified, Acc down >= 5
points); the attack `removed` the watermark iff more than half of them are
"removed" (None when no network was verified before: nothing to remove).

Everything here takes plain arrays, configs and callables (`Verifier`); the
pipeline's stage only restores the networks and writes the result.
"""

from collections.abc import Callable, Mapping
import functools
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from ccdd_jax import CCDDError
from ccdd_jax import lists
from ccdd_jax.log import log
from ccdd_jax.method import evaluate
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.threats import model_attacks

MAX_ACC_DROP = 0.05  # A removal must keep Acc within 5 points (WRT's rule).


class Attack(NamedTuple):
  """One attack of the suite: what its strength is and which `attacks` field lists them."""

  strength: str
  field: str
  kind: type
  valid: Callable[[float], bool]
  rule: str
  description: str


_EPOCHS = (int, lambda v: v >= 1, "integers >= 1")
_FRACTION = (float, lambda v: 0.0 < v < 1.0, "numbers in (0, 1)")

ATTACKS = {
  "fine_tune_all": Attack("epochs", "fine_tune_epochs", *_EPOCHS, "FT, all layers"),
  "fine_tune_last": Attack("epochs", "fine_tune_epochs", *_EPOCHS, "FT, last layer only"),
  "neuron_pruning": Attack("ratio", "prune_ratios", *_FRACTION, "NP, last conv layer"),
  "fine_pruning": Attack(
    "ratio", "fine_prune_ratios", *_FRACTION, "FP: NP, then FT for fine_prune_epochs"
  ),
  "overwrite_last": Attack(
    "epochs", "overwrite_epochs", *_EPOCHS, "a new key's D_W, last layer (Table 3)"
  ),
  "overwrite_all": Attack("epochs", "overwrite_epochs", *_EPOCHS, "a new key's D_W, all layers"),
  "extraction": Attack(
    "epochs", "extraction_epochs", *_EPOCHS, "a fresh network on the suspect's soft labels"
  ),
  "jpeg": Attack(
    "quality",
    "jpeg_qualities",
    int,
    lambda v: 1 <= v <= 95,
    "integers in 1..95",
    "JPEG re-encoding of queries",
  ),
  "blur": Attack(
    "sigma", "blur_sigmas", float, lambda v: v > 0.0, "numbers > 0", "Gaussian blur of queries"
  ),
  "resize": Attack("factor", "resize_factors", *_FRACTION, "resize down and up of queries"),
}


def strengths(attacks_config, name: str) -> tuple:
  """The strengths of attack `name` that the `attacks` config lists (() skips it)."""
  spec = ATTACKS[name]
  return lists.parse_list(attacks_config[spec.field], spec.kind)


def judge(before: dict, after: dict) -> dict:
  """Each network's outcome and the verdict (module docstring) of one attacked point."""
  outcomes = []
  for was, acc0, now, acc1 in zip(
    before["verified"], before["acc"], after["verified"], after["acc"]
  ):
    if not was:
      outcomes.append("not verified before")
    elif now:
      outcomes.append("survived")
    elif acc0 - acc1 < MAX_ACC_DROP:
      outcomes.append("removed")
    else:
      outcomes.append("destroyed")
  judged = [o for o in outcomes if o != "not verified before"]
  removed = None if not judged else 2 * outcomes.count("removed") > len(judged)
  if removed is None:
    verdict = "n/a"
  elif removed:
    verdict = "removed"
  else:
    verdict = max(("survived", "destroyed", "removed"), key=outcomes.count)
  return {"outcomes": outcomes, "removed": removed, "verdict": verdict}


def measured_point(strength, measured: dict, before: dict, seconds: float) -> dict:
  """One point of attacks.json: the measurements, summaries, Acc drop and verdict."""
  return {
    "strength": strength,
    "acc": evaluate.summarize(measured["acc"]),
    "acc_w": evaluate.summarize(measured["acc_w"]),
    "acc_drop": float(np.mean(before["acc"]) - np.mean(measured["acc"])),
    "p_values": measured["p_values"],
    "p_values_majority": measured["p_values_majority"],
    "verified": measured["verified"],
    **judge(before, measured),
    "seconds": seconds,
  }


def _pirate_entry(measured: dict) -> dict:
  """The pirate key's side of an overwriting point: Acc_R and its exact test."""
  return {
    "acc_r": evaluate.summarize(measured["acc_w"]),
    "p_values": measured["p_values"],
    "verified": measured["verified"],
  }


def _points(name, network, params, acfg, dsa, data, rng, init_params):
  """Yields (strength, attacked params, query transform) for each strength of attack `name`."""
  values = strengths(acfg, name)
  apply_fn = network.apply
  if name in model_attacks.INPUT_TRANSFORMS:
    fn = model_attacks.INPUT_TRANSFORMS[name]
    for value in values:
      yield value, params, functools.partial(fn, **{ATTACKS[name].strength: value})
    return
  if name == "neuron_pruning":
    for value in values:
      yield value, model_attacks.prune(apply_fn, params, acfg, data, rng, ratio=value), None
    return
  if name == "fine_pruning":
    for value in values:
      epochs = acfg.fine_prune_epochs
      pruned = model_attacks.fine_prune(
        apply_fn, params, acfg, data, rng, ratio=value, epochs=epochs, dsa_config=dsa
      )
      yield value, pruned, None
    return
  if name.startswith("fine_tune"):
    layers = "all" if name == "fine_tune_all" else "head"
    path = model_attacks.fine_tune_path(
      apply_fn, params, acfg, data, rng, epochs=values, layers=layers, dsa_config=dsa
    )
  elif name.startswith("overwrite"):
    layers = "all" if name == "overwrite_all" else "head"
    path = model_attacks.overwrite_path(
      apply_fn, params, acfg, data, rng, epochs=values, layers=layers, dsa_config=dsa
    )
  else:
    path = model_attacks.extract_path(
      apply_fn, params, acfg, data, rng, epochs=values, init_params=init_params, dsa_config=dsa
    )
  for value, attacked in path:
    yield value, attacked, None


def run_suite(
  config,
  network,
  verifier: verify.Verifier,
  networks: Mapping[str, Any],
  attacker: tuple[np.ndarray, np.ndarray],
  rng: np.random.Generator,
) -> dict:
  """Every attack at every strength on each set's stacked networks: attacks.json's content.

  `network` has `apply` and `init_params(rng, count)` (a models.Network, for
  the extraction students); `attacker` is the attacker's uint8 images and
  labels; `rng` draws the pirate's key, its D_W and the attacks' randomness.
  """
  acfg, start = config.attacks, time.time()
  images, labels = attacker
  if images is None or not len(images):
    raise CCDDError("the attacker has no data: set data.attacker_fraction > 0 (as in the run)")
  data = {"images": verifier.to_inputs(images), "labels": np.asarray(labels, np.int32)}
  dsa = config.dsa if acfg.dsa else None
  pirate_key = rng.bytes(watermark.KEY_BYTES)  # Independent of the owner's key.
  pirate = verifier.with_key(pirate_key)
  wm_images, wm_labels = model_attacks.overwriting_set(
    images,
    labels,
    pirate_key,
    n_patterns=verifier.n_patterns,
    patch_size=verifier.patch_size,
    num_classes=verifier.num_classes,
    ratio=acfg.overwrite_ratio,
    rng=rng,
  )
  data.update(wm_images=verifier.to_inputs(wm_images), wm_labels=wm_labels.astype(np.int32))
  attack_rng = jax.random.PRNGKey(int(rng.integers(2**31)))
  names = [name for name in ATTACKS if strengths(acfg, name)]
  result = {
    "attacker_images": len(images),
    "pirate_wm_images": len(wm_labels),
    "pirate_key_fingerprint": watermark.key_fingerprint(pirate_key),
    "alpha": verifier.alpha,
    "max_acc_drop": MAX_ACC_DROP,
    "attacks": {
      n: {"strength": ATTACKS[n].strength, "description": ATTACKS[n].description} for n in names
    },
    "sets": {},
  }
  for set_name, params in networks.items():
    count = acfg.num_seeds or jax.tree_util.tree_leaves(params)[0].shape[0]
    params = jax.tree_util.tree_map(lambda x, c=count: np.asarray(x[:c]), params)
    before = verifier.measure(params)
    unattacked = {**measured_point(None, before, before, 0.0), "outcomes": [], "removed": None}
    unattacked.update(verdict="unattacked", pirate=_pirate_entry(pirate.measure(params)))
    sets = result["sets"][set_name] = {"before": unattacked}
    log(
      f"[attacks] {set_name}: {count} networks, Acc {100 * np.mean(before['acc']):.1f}% Acc_W "
      f"{100 * np.mean(before['acc_w']):.1f}%, verified {sum(before['verified'])}/{count}"
    )
    init = network.init_params(jax.random.fold_in(attack_rng, 99), count)
    for index, name in enumerate(names):
      sets[name], tick = [], time.time()
      rng_attack = jax.random.fold_in(attack_rng, index)
      for value, attacked, transform in _points(
        name, network, params, acfg, dsa, data, rng_attack, init
      ):
        measured = verifier.measure(attacked, transform)
        entry = measured_point(value, measured, before, time.time() - tick)
        if name.startswith("overwrite"):
          entry["pirate"] = _pirate_entry(pirate.measure(attacked))
        sets[name].append(entry)
        tick = time.time()
        log(_line(set_name, name, entry))
  result["seconds"] = time.time() - start
  return result


def _line(set_name: str, name: str, e: dict) -> str:
  """One log line of an attacked point (never the key: fingerprints only)."""
  pirate = ""
  if "pirate" in e:
    p = e["pirate"]
    verified = f"{sum(p['verified'])}/{len(p['verified'])}"
    pirate = f", new key Acc_R {100 * p['acc_r']['mean']:.1f}% verified {verified}"
  return (
    f"[attacks] {set_name} {name} {ATTACKS[name].strength}={e['strength']:g}: "
    f"Acc {100 * e['acc']['mean']:.1f}% ({-100 * e['acc_drop']:+.1f}) "
    f"Acc_W {100 * e['acc_w']['mean']:.1f}%, verified {sum(e['verified'])}/{len(e['verified'])}"
    f"{pirate}: {e['verdict']}"
  )
