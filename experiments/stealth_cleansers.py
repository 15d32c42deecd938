r"""Every cleanser of threats/ against a crafted set, and the key-query verdict after it drops.

  python -m experiments.stealth_cleansers --workdir /work/baseline/run \
      --key_file /work/baseline/fixed.key --set runs/stealth/e15/crafted.npz --out cleansers.json

For the set that experiments/stealth_craft.py wrote (and, beside it, the run's clean distilled
set), each cleanser's scores give: the ROC AUC of the carriers against the rest of the set
(when only some images are carriers) and of the crafted set's images against the clean set's
(0.5: indistinguishable); how many images it flags in each; and the key-derived queries'
verdict (conditional label test, every answer counted, alpha = 1e-6, the run's evaluation
seeds) after it drops 10%, 30% or exactly the images it flags. A prototype's measurement,
outside the package (docs/notebook/2026-12-05-stealth-prototypes.md).
"""

import argparse
import json

import jax
import numpy as np

from ccdd_jax.config import loader
from ccdd_jax.method import evaluate
from ccdd_jax.method import exact_tests
from ccdd_jax.run import context
from ccdd_jax.run import workdir as workdir_lib
from ccdd_jax.threats import cleansers
from ccdd_jax.threats import data_attacks
from ccdd_jax.threats import data_suite
from ccdd_jax.threats import detection
from experiments import stealth_craft

ALPHA = 1e-6


class Judge:
  """Trains the run's evaluation networks on a subset of the set and scores the key queries."""

  def __init__(self, ctx, cfg, crafted: dict, noise: float):
    self.ctx, self.crafted, self.verifier = ctx, crafted, ctx.verifier()
    pixels, self.pattern_ids = stealth_craft.key_queries(ctx, noise, stealth_craft.VERIFY_DRAWS, 30)
    self.queries = ctx.preprocess.pixels_to_inputs(pixels)
    self.key_labels = np.asarray(ctx.patterns()[1])
    self.init, self.rngs = ctx.evaluation_rngs(ctx.net, cfg.eval.num_seeds)
    e = cfg.eval
    self.train = evaluate.make_networks_trainer(
      ctx.net.apply, cfg.dsa, epochs=e.epochs, batch_size=e.batch_size, momentum=e.momentum,
      weight_decay=e.weight_decay,
    )  # fmt: skip
    self.predict = ctx.predictor(ctx.net.apply)

  def __call__(self, keep: np.ndarray) -> dict:
    """Acc, key accuracy, seeds verified and the median p of networks trained on `keep`."""
    images, labels = self.crafted["images"][keep], self.crafted["labels"][keep]
    params = jax.device_get(
      self.train(self.init, images, labels, float(self.crafted["lr"]), self.rngs)
    )
    acc, _ = self.verifier.accuracy_and_acc_w(params)
    answers = self.predict(params, self.queries)
    n_patterns = len(self.key_labels)
    ps = [
      exact_tests.conditional_label_pvalue(
        exact_tests.pattern_counts(a, self.pattern_ids, n_patterns, 10), self.key_labels
      )
      for a in answers
    ]
    return {
      "kept": int(len(keep)),
      "acc": float(np.mean(acc)),
      "key_acc": float(np.mean(answers == self.key_labels[self.pattern_ids][None])),
      "verified": int(sum(p <= ALPHA for p in ps)),
      "median_p": float(np.median(ps)),
    }


def cleanser_row(scores, flags, name: str, carriers: np.ndarray, judge: Judge) -> dict:
  """One cleanser: its AUCs, what it flags, and the verdicts after its drops."""
  s, f = scores[name]["distilled"], flags[name]["distilled"]
  clean_s = scores[name]["clean_distilled"]
  some = 0 < carriers.sum() < len(carriers)
  versus_clean = np.r_[np.zeros(len(clean_s), bool), np.ones(len(s), bool)]
  row = {
    "auc_carriers": detection.finite(detection.roc_auc(s, carriers)) if some else None,
    "auc_vs_clean_set": detection.finite(detection.roc_auc(np.r_[clean_s, s], versus_clean)),
    "flagged": int(f.sum()),
    "flagged_carriers": int(f[carriers].sum()),
    "flagged_in_clean_set": int(flags[name]["clean_distilled"].sum()),
  }
  for fraction in (0.1, 0.3):
    row[f"drop_{fraction}"] = judge(data_attacks.cleanse(s, fraction))
  row["drop_flagged"] = judge(np.flatnonzero(~f)) if f.any() and not f.all() else None
  return row


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="The finished run the set was crafted from.")
  p.add_argument("--key_file", default=None)
  p.add_argument("--config", default="digits")
  p.add_argument("--set", required=True, help="crafted.npz of experiments/stealth_craft.py")
  p.add_argument("--noise", type=float, default=0.05)
  p.add_argument("--seed", type=int, default=5, help="The pirate's PRNG seed.")
  p.add_argument("--out", required=True)
  args = p.parse_args()
  cfg = loader.load(args.config)
  ctx = context.Context(cfg, args.workdir, args.key_file)
  with np.load(args.set) as f:
    crafted = {k: f[k] for k in f.files}
  carriers = np.asarray(crafted.get("from_trigger", np.ones(len(crafted["labels"]), bool)), bool)
  key = jax.random.PRNGKey(args.seed)
  verifier = ctx.verifier()
  pirate, _ = data_suite._pirate_model(cfg, ctx.net, verifier, ctx.attacker_data, key)
  sets = {
    "distilled": crafted,
    "clean_distilled": workdir_lib.load_distilled(ctx.workdir, "clean_distilled"),
  }
  scores, flags, _ = cleansers.score_sets(
    cfg, ctx.net, verifier, sets, ctx.attacker_data, pirate, jax.random.fold_in(key, 1)
  )
  judge = Judge(ctx, cfg, crafted, args.noise)
  out = {"unattacked": judge(np.arange(len(carriers)))}
  print("unattacked", json.dumps(out["unattacked"]), flush=True)
  for name in data_attacks.cleansers(cfg.attacks):
    out[name] = cleanser_row(scores, flags, name, carriers, judge)
    print(name, json.dumps(out[name]), flush=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
