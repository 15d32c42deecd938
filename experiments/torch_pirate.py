r"""A pirate outside the package: PyTorch, its own ConvNet and training loop, on a released set.

  python -m experiments.torch_pirate --set ROOT/crafted.npz --queries ROOT/queries.npz
  python -m experiments.torch_pirate --workdir RUN [--config NAME] [--key_file F] \
      [--override distill.ipc=20 ...]

The second form takes a finished run of the package: it trains on RUN/distilled.npz, answers
RUN/queries.npz (the released query file, whatever the protocol) in its order, writes each
network's answers to RUN/torch_pirate/answers_<seed>.txt, and the owner verifies each with the
key alone (`--stage=verify --predictions`, the black-box path; the run's --config is needed).

It trains on the set's [0, 1] `pixels` and `labels` only (standardised by the set's own mean
and std; SGD momentum 0.9, weight decay 5e-4, cosine schedule, batch 64, a random shift of up
to one pixel; a BatchNorm ConvNet that this package never uses), then answers the owner's key
queries. The owner scores the answers with the conditional label test (every answer counted).
Needs `pip install -e '.[bench]'` (torch).
"""

import argparse
import json
import pathlib

import numpy as np

from ccdd_jax.config import loader
from ccdd_jax.method import exact_tests
from ccdd_jax.run import blackbox
from ccdd_jax.run import context
from ccdd_jax.run import pipeline


def make_net(torch, channels: int, classes: int):
  """The pirate's own ConvNet (three 3x3 conv layers with BatchNorm, global average pooling)."""
  nn = torch.nn
  return nn.Sequential(
    nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
    nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
    nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
    nn.Flatten(), nn.Linear(64, classes),
  )  # fmt: skip


def train_and_answer(torch, released, queries, seed: int, epochs: int, score=True) -> dict:
  """One pirate network: its test accuracy, its answers' key accuracy and p-value (its test
  accuracy and raw answers with `score` False)."""
  x = torch.tensor(released["pixels"], dtype=torch.float32).permute(0, 3, 1, 2)
  y = torch.tensor(released["labels"], dtype=torch.long)
  mean, std = x.mean(), x.std()
  to_input = lambda a: (torch.tensor(a, dtype=torch.float32).permute(0, 3, 1, 2) - mean) / std
  torch.manual_seed(seed)
  shifts = np.random.default_rng(seed)
  model = make_net(torch, x.shape[1], 10)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
  inputs = (x - mean) / std
  for _ in range(epochs):
    model.train()
    order = torch.randperm(len(y))
    for start in range(0, len(y), 64):
      batch = order[start : start + 64]
      dx, dy = (int(v) for v in shifts.integers(-1, 2, 2))
      logits = model(torch.roll(inputs[batch], shifts=(dx, dy), dims=(2, 3)))
      loss = torch.nn.functional.cross_entropy(logits, y[batch])
      opt.zero_grad()
      loss.backward()
      opt.step()
    schedule.step()
  model.eval()
  with torch.no_grad():
    acc = model(to_input(queries["test_pixels"])).argmax(1).numpy() == queries["test_labels"]
    answers = model(to_input(queries["q_pixels"])).argmax(1).numpy()
  if not score:
    return {"acc": float(acc.mean()), "answers": answers}
  labels, pid = queries["ylab"], queries["q_pid"]
  counts = exact_tests.pattern_counts(answers, pid, len(labels), 10)
  return {
    "acc": float(acc.mean()),
    "acc_key": float(np.mean(answers == labels[pid])),
    "p": exact_tests.conditional_label_pvalue(counts, labels),
  }


def verify_run(torch, args) -> list[dict]:
  """The --workdir form: each pirate network's answers to queries.npz, verified by the owner."""
  workdir, config = pathlib.Path(args.workdir), loader.load(args.config, args.override)
  key_file = args.key_file or str(workdir / "owner.key")
  ds = context.Context(config, workdir, key_file).dataset
  released = dict(np.load(workdir / "distilled.npz"))
  images = blackbox.read_queries(workdir / blackbox.QUERIES_FILE).astype(np.float32) / 255.0
  test = ds.test_images.astype(np.float32) / 255.0
  out = workdir / "torch_pirate"
  out.mkdir(exist_ok=True)
  results = []
  for seed in range(args.seeds):
    queries = {"test_pixels": test, "test_labels": ds.test_labels, "q_pixels": images}
    model_answers = train_and_answer(torch, released, queries, seed, args.epochs, score=False)
    path = out / f"answers_{seed}.txt"
    np.savetxt(path, model_answers["answers"], fmt="%d")
    verdict = pipeline.run(config, str(workdir), "verify", key_file, predictions=str(path))
    results.append(
      {"acc": model_answers["acc"], "acc_key": verdict["acc_w"], "p": verdict["p_value"]}
    )
  return results


def main(argv=None):
  """Trains `--seeds` pirate networks and prints each one's figures and the verdict count."""
  import torch  # pylint: disable=g-import-not-at-top  # Only this script needs it.

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--set", help="A prototype's crafted.npz (with --queries).")
  p.add_argument("--queries", help="The prototype's queries.npz (pattern ids and labels).")
  p.add_argument("--workdir", help="A finished run of the package (instead of --set).")
  p.add_argument("--config", default="digits", help="The run's config (with --workdir).")
  p.add_argument("--key_file", default=None, help="The owner's key (with --workdir).")
  p.add_argument(
    "--override", action="append", default=[], help="field=value the run was made with (repeat)"
  )
  p.add_argument("--seeds", type=int, default=5)
  p.add_argument("--epochs", type=int, default=300)
  args = p.parse_args(argv)
  if args.workdir:
    results = verify_run(torch, args)
  else:
    released, queries = np.load(args.set), np.load(args.queries)
    results = [
      train_and_answer(torch, released, queries, s, args.epochs) for s in range(args.seeds)
    ]
  for r in results:
    print(json.dumps(r))
  print(
    f"verified {sum(r['p'] <= 1e-6 for r in results)}/{len(results)}, "
    f"Acc {100 * np.mean([r['acc'] for r in results]):.1f}%, "
    f"key queries {100 * np.mean([r['acc_key'] for r in results]):.1f}%"
  )


if __name__ == "__main__":
  main()
