r"""Forged keys at scale: networks that never saw a key, verified against keys they never saw.

  python -m experiments.forged_keys --workdir runs/forged [--keys 20] [--config digits] \
      [--set eval.width=8] [--out runs/forged]

For every network saved under <workdir>/models/<arch>/<set> (every seed, every
architecture of evaluation.json) and --keys keys per network, derived from
--seed (SHA-256("ccdd/forged-keys\x00" ‖ seed ‖ index), one fresh key per pair,
none of which any network saw), it builds that key's black-box queries
(`blackbox.query_set`: either query protocol), predicts, and decides with the exact test
(`verify.file_answers_result`, the same `verify.decide` as the pipeline).
Networks trained on the watermarked distilled set carry the owner's watermark:
against other keys they are the hardest forgery case. The owner's own key is
run too, on the same queries path, as the power check (not counted as forged).

Writes <out>/forged_keys.json (the table and every pair's p-values),
<out>/forged_keys.md (the markdown table of claims at alpha = 1e-6, 1e-2 and
5e-2 with P[Bin(pairs, alpha) >= claims], also printed) and
<out>/forged_keys.png (QQ plot of the p-values against uniform); --out is the
workdir unless given. Nothing is written into docs/: copy a figure there by hand.
--set takes the config overrides the workdir was evaluated with (e.g.
eval.width=8); the networks' shapes must match.
"""

import argparse
import hashlib
import json
import pathlib
import sys
import time

import jax
import numpy as np
from scipy import stats

from ccdd_jax.config import loader as config_loader
from ccdd_jax.method import verify
from ccdd_jax.method import watermark
from ccdd_jax.run import blackbox
from ccdd_jax.run import checkpoints
from ccdd_jax.run import context
from ccdd_jax.run import reporting
from ccdd_jax.run import workdir as workdir_lib

ALPHAS = (1e-6, 1e-2, 5e-2)
KEY_TAG = b"ccdd/forged-keys\x00"
OWNER_FIELDS = ("verified", "p_value", "p_value_majority", "acc_w")


def forged_key(seed: int, index: int) -> bytes:
  """The index-th forged key of a seed: SHA-256(KEY_TAG ‖ u32be(seed) ‖ u32be(index))."""
  return hashlib.sha256(KEY_TAG + seed.to_bytes(4, "big") + index.to_bytes(4, "big")).digest()


def group_of(arch: str, name: str, primary: str) -> str:
  """The table row a network belongs to."""
  label = "distilled (watermarked, other keys)" if name == "distilled" else name
  return f"{label}, {'distillation model' if arch == primary else 'other architectures'}"


def verify_pair(ctx, predict, params, key) -> dict:
  """Black-box verification of one network against one key (queries built from the key)."""
  ds, wcfg = ctx.dataset, ctx.config.watermark
  patterns, pattern_labels = ctx.patterns(key)
  queries, plan = blackbox.query_set(key, ds, patterns, wcfg)  # Either query protocol.
  predictions = predict(params, ctx.preprocess.apply(queries))[0].astype(np.int64)
  return verify.file_answers_result(
    predictions, key, plan, pattern_labels, ds.num_classes, wcfg.queries_per_pattern, wcfg.alpha
  )


def claims_table(rows: list[dict]) -> list[dict]:
  """Per group and overall: pairs, claims at each alpha (both tests), binomial tail of the count."""
  groups = sorted({r["group"] for r in rows}) + ["all forged pairs"]
  table = []
  for group in groups:
    chosen = [r for r in rows if group in ("all forged pairs", r["group"])]
    p = np.array([r["p_value"] for r in chosen])
    p_major = np.array([r["p_value_majority"] for r in chosen])
    entry = {"group": group, "pairs": len(chosen), "min_p": float(p.min())}
    for alpha in ALPHAS:
      k = int((p <= alpha).sum())
      entry[f"claims@{alpha:g}"] = k
      entry[f"majority_claims@{alpha:g}"] = int((p_major <= alpha).sum())
      entry[f"binom_tail@{alpha:g}"] = float(stats.binom.sf(k - 1, len(chosen), alpha))
    table.append(entry)
  return table


def markdown(table: list[dict], owner: list[dict]) -> str:
  """The results table, and the owner's-key power check."""
  lines = [
    "| networks vs keys they never saw | pairs | claims α=1e-6 | claims α=1e-2 (rate) "
    "| claims α=5e-2 (rate) | P[Bin ≥ claims] at 1e-2 / 5e-2 | plurality test claims "
    "1e-6 / 1e-2 / 5e-2 | smallest p |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for e in table:
    n = e["pairs"]
    lines.append(
      f"| {e['group']} | {n} | {e['claims@1e-06']} "
      f"| {e['claims@0.01']} ({100 * e['claims@0.01'] / n:.1f}%) "
      f"| {e['claims@0.05']} ({100 * e['claims@0.05'] / n:.1f}%) "
      f"| {e['binom_tail@0.01']:.2f} / {e['binom_tail@0.05']:.2f} "
      f"| {e['majority_claims@1e-06']} / {e['majority_claims@0.01']} / "
      f"{e['majority_claims@0.05']} | {e['min_p']:.2g} |"
    )
  if owner:
    p = [r["p_value"] for r in owner]
    lines.append("")
    lines.append(
      f"Power check, the owner's key on the watermarked-distilled networks: verified "
      f"{sum(r['verified'] for r in owner)}/{len(owner)} (median p = {np.median(p):.2g})."
    )
  return "\n".join(lines)


def qq_plot(path: pathlib.Path, rows: list[dict], title: str) -> None:
  """p-values against uniform quantiles, log-log, one series per group (Figure API)."""
  from matplotlib.figure import Figure  # Imported on first use: it is slow to import.

  fig = Figure(figsize=(5.5, 5))
  ax = fig.subplots()
  floor = 1.0
  for group in sorted({r["group"] for r in rows}):
    p = np.sort([r["p_value"] for r in rows if r["group"] == group])
    expected = (np.arange(1, p.size + 1) - 0.5) / p.size
    floor = min(floor, expected[0], max(p[0], 1e-12))
    ax.plot(expected, np.maximum(p, 1e-12), ".", ms=3, label=f"{group} ({p.size})")
  ax.plot([floor, 1], [floor, 1], "k-", lw=0.8, label="uniform (exact test)")
  for alpha in ALPHAS[1:]:
    ax.axhline(alpha, color="grey", ls=":", lw=0.8)
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("uniform quantile")
  ax.set_ylabel("observed p-value (conditional label test)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def forged_pairs(ctx, evaluation: dict, keys: int, seed: int) -> tuple[list, list]:
  """Every saved network against `keys` forged keys each (rows), and the owner's key against
  the watermarked-distilled networks (owner)."""
  config, start = ctx.config, time.time()
  rows, owner, index = [], [], 0
  for arch, sets in evaluation.items():
    net = ctx.network(arch)
    predict = ctx.predictor(net.apply)
    for name in sets:
      stacked = checkpoints.restore_networks(
        workdir_lib.networks_dir(ctx.workdir, arch, name), net.like_params(), config.eval.num_seeds
      )
      for network_seed in range(config.eval.num_seeds):
        params = jax.tree_util.tree_map(lambda x, s=network_seed: x[s : s + 1], stacked)
        if name == "distilled":
          r = verify_pair(ctx, predict, params, ctx.key)
          owner.append({"arch": arch, "seed": network_seed, **{k: r[k] for k in OWNER_FIELDS}})
        for _ in range(keys):
          r = verify_pair(ctx, predict, params, forged_key(seed, index))
          index += 1
          rows.append(
            {
              "arch": arch,
              "set": name,
              "seed": network_seed,
              "group": group_of(arch, name, config.model.name),
              "key_fingerprint": r["key_fingerprint"],
              "p_value": r["p_value"],
              "p_value_majority": r["p_value_majority"],
              "acc_w": r["acc_w"],
            }
          )
      print(f"{arch} {name}: {len(rows)} pairs ({time.time() - start:.0f} s)", file=sys.stderr)
  return rows, owner


def write_outputs(
  out: pathlib.Path, rows: list[dict], owner: list[dict], title: str, seconds: float
) -> str:
  """<out>/forged_keys.json, forged_keys.md and forged_keys.png; returns the markdown."""
  table = claims_table(rows)
  out.mkdir(parents=True, exist_ok=True)
  p_values = {}  # Per group, both tests' p-values (4 significant digits), pair by pair.
  for r in rows:
    entry = p_values.setdefault(r["group"], {"p_value": [], "p_value_majority": []})
    for field in entry:
      entry[field].append(float(f"{r[field]:.4g}"))
  summary = {"table": table, "owner_key": owner, "p_values": p_values, "seconds": seconds}
  reporting.write_text(out / "forged_keys.json", json.dumps(summary) + "\n")  # Compact: ~100 kB.
  text = markdown(table, owner)
  reporting.write_text(out / "forged_keys.md", text + "\n")
  qq_plot(out / "forged_keys.png", rows, title)
  return text


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="digits")
  parser.add_argument("--set", action="append", default=[], help="config override field=value")
  parser.add_argument("--keys", type=int, default=20, help="forged keys per network")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="", help="where the outputs go (default: the workdir)")
  args = parser.parse_args()
  config = config_loader.load(args.config, args.set)
  workdir = pathlib.Path(args.workdir)
  ctx = context.Context(config, workdir, workdir / "owner.key")
  evaluation = reporting.read_json(workdir / "evaluation.json")
  if not evaluation:
    sys.exit(f"error: no evaluated networks in {workdir}: run the pipeline there first")
  start = time.time()
  rows, owner = forged_pairs(ctx, evaluation, args.keys, args.seed)
  owner_fp = watermark.key_fingerprint(ctx.key)
  if any(r["key_fingerprint"] == owner_fp for r in rows):  # 2^-256 per pair.
    sys.exit("error: a forged key is the owner's key")
  title = f"{len(rows)} forged (network, key) pairs, {ctx.dataset.name}"
  seconds = round(time.time() - start, 1)
  print(write_outputs(pathlib.Path(args.out or workdir), rows, owner, title, seconds))
  print(json.dumps({"pairs": len(rows), "seconds": seconds}))


if __name__ == "__main__":
  main()
