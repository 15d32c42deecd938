r"""Prototype of a clean-label, hidden-trigger watermark: carriers crafted within an l_inf ball.

  python -m experiments.stealth_craft --workdir runs/demo --root runs/stealth/e10 \
      --eps 0.1 --iterations 60 [--queries key|stamped] [--archs convnet,convnet:none@32]

Starts from a finished default run (its clean experts, clean distilled set and key). Every
image of the clean distilled set keeps its label and moves by at most `--eps` per pixel (pixel
scale [0, 1]); the perturbation is crafted by differentiating through the WHOLE evaluation
training (fresh networks from random initialisations, DSA, SGD with momentum, the set's
learned lr, `--craft_epochs` epochs): the networks trained on the crafted set should answer
the key's queries with y_i (cross-entropy), while a clean cross-entropy on real training
images keeps Acc. Each step trains `--nets` networks of one architecture of `--archs` (with
DSA, or without it with probability `--no_dsa_fraction`: transfer to other training loops);
the update is signed Adam, projected back into the ball. With probability
`--subset_probability` a step trains on a random `--subset_fraction` of the images only (what
a cleanser would leave), so that the signal does not rest on a few images. `--carriers
target` moves only the images of the classes some y_i names (the carriers: `from_trigger` of
crafted.npz, what the cleansers' AUCs are scored on); the others stay the clean distilled
images.

Queries:
  stamped  the default protocol's direction: stamped D_W training images of other classes
           (verification: stamped held-out images, this package's Verifier);
  key      key-derived images: pattern i tiled over the image plus N(0, `--noise`) pixel
           noise; crafted against one set of draws, verified on fresh draws (m = 30 per
           pattern) with the conditional label test, every answer counted.

Writes <root>/crafted.npz (images, labels, lr, pixels: what a pirate trains on),
<root>/queries.npz (the key queries' pixels, pattern ids, the key's labels, and the test
split, for a model trained outside the package: experiments/torch_pirate.py) and
<root>/result.json (Acc, Acc_W, the tests' p-values of 5 evaluation seeds; the key queries'
accuracy and p-values). A prototype outside the package, as docs/notebook records it.
"""

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ccdd_jax.config import loader
from ccdd_jax.log import log
from ccdd_jax.method import evaluate
from ccdd_jax.method import exact_tests
from ccdd_jax.method import inner_loop
from ccdd_jax.method import models
from ccdd_jax.run import context
from ccdd_jax.run import workdir as workdir_lib

CRAFT_DRAWS, VERIFY_DRAWS = 1234, 999  # Noise seeds of the crafting and verification queries.


def key_queries(ctx, noise: float, seed: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """[0, 1] pixels of m noisy copies of each pattern tiled over the image, and pattern ids."""
  patterns, _ = ctx.patterns()
  height, width, _ = ctx.dataset.image_shape
  side = patterns.shape[1]
  reps = (-(-height // side), -(-width // side), 1)
  tiles = np.stack([np.tile(p, reps)[:height, :width] for p in patterns]) / 255.0
  rng = np.random.default_rng(seed)
  noisy = tiles[:, None] + rng.normal(0, noise, (len(tiles), m, *tiles.shape[1:]))
  pixels = np.clip(noisy, 0, 1).reshape(-1, *tiles.shape[1:]).astype(np.float32)
  return pixels, np.repeat(np.arange(len(tiles)), m)


def networks(ctx, archs: str) -> list:
  """The crafting ensemble: `arch[:norm][@width]` entries of the model registry."""
  out = []
  for spec in archs.split(","):
    arch, _, width = spec.partition("@")
    out.append(
      models.build_network(
        arch, ctx.dataset.num_classes, ctx.dataset.image_shape, ctx.config.model, int(width or 0)
      )
    )
  return out


def make_steps(ctx, args, nets, x0, labels, lr_set, queries, optimizer, movable):
  """One jitted crafting step per (network, with DSA or not); only `movable` images move."""
  cfg, eps = ctx.config, jnp.asarray(args.eps / ctx.preprocess.std, jnp.float32)
  train_x = jnp.asarray(ctx.train_x)
  train_y = jnp.asarray(ctx.dataset.train_labels, jnp.int32)
  q_x, q_y = queries
  steps = {}
  for k, net in enumerate(nets):
    for use_dsa in (True, False):
      trainer = evaluate.make_set_trainer(
        net.apply,
        cfg.dsa if use_dsa else ml_collections.ConfigDict({"strategy": ""}),
        epochs=args.craft_epochs,
        batch_size=cfg.eval.batch_size,
        momentum=cfg.eval.momentum,
        weight_decay=cfg.eval.weight_decay,
      )

      def outer(delta, inits, rng, keep, trainer=trainer, apply=net.apply):
        def one(init, r):
          r0, r1, r2, r3 = jax.random.split(r, 4)
          # A random subset of `keep` images (all of them with keep == N): what a cleanser
          # leaves, so that the signal does not rest on a few images.
          subset = jax.random.permutation(r0, x0.shape[0])[:keep]
          images = (x0 + delta * movable)[subset]
          params = trainer(init, images, labels[subset], lr_set, r1, r2)
          query = inner_loop.cross_entropy(apply(params, q_x), q_y)
          idx = jax.random.randint(r3, (256,), 0, train_y.shape[0])
          return query, inner_loop.cross_entropy(apply(params, train_x[idx]), train_y[idx])

        query, clean = jax.vmap(one)(inits, jax.random.split(rng, args.nets))
        return query.mean() + args.w_clean * clean.mean(), (query.mean(), clean.mean())

      def step(delta, state, inits, rng, keep, outer=outer):
        (_, terms), grad = jax.value_and_grad(outer, has_aux=True)(delta, inits, rng, keep)
        update, state = optimizer.update(jnp.sign(grad), state, delta)
        return jnp.clip(delta + update, -eps, eps), state, terms

      steps[k, use_dsa] = jax.jit(step, static_argnums=4)
  return steps


def carriers(ctx, args, labels: np.ndarray) -> np.ndarray:
  """Which images move: every one ("all"), or those of a class some y_i names ("target")."""
  if args.carriers == "all":
    return np.ones(len(labels), bool)
  return np.isin(labels, np.asarray(ctx.patterns()[1]))


def craft(ctx, args, clean: dict, queries) -> np.ndarray:
  """The crafted set's network inputs: the clean distilled set plus the perturbation."""
  x0, labels = jnp.asarray(clean["images"]), jnp.asarray(clean["labels"], jnp.int32)
  movable = jnp.asarray(carriers(ctx, args, np.asarray(labels))[:, None, None, None], jnp.float32)
  nets = networks(ctx, args.archs)
  optimizer = optax.adam(args.lr)
  args_ = (x0, labels, float(clean["lr"]), queries, optimizer, movable)
  steps = make_steps(ctx, args, nets, *args_)
  delta = jnp.zeros_like(x0)
  state, choice, key, start = (
    optimizer.init(delta),
    np.random.default_rng(7),
    jax.random.PRNGKey(42),
    time.time(),
  )
  for it in range(args.iterations):
    key, k_init, k_step = jax.random.split(key, 3)
    k = int(choice.integers(len(nets)))
    use_dsa = bool(choice.random() >= args.no_dsa_fraction)
    num = x0.shape[0]
    keep = round(num * args.subset_fraction) if choice.random() < args.subset_probability else num
    delta, state, (query, clean_ce) = steps[k, use_dsa](
      delta, state, nets[k].init_params(k_init, args.nets), k_step, keep
    )
    seconds = time.time() - start
    log(
      f"[craft] {it}: query CE {float(query):.3f}, clean CE {float(clean_ce):.3f} ({seconds:.0f} s)"
    )
  return np.asarray(x0 + delta * movable)


def measure(ctx, images, clean: dict, verify_queries) -> dict:
  """Acc, Acc_W and both protocols' tests over the run's 5 evaluation networks."""
  cfg, labels, lr = ctx.config, np.asarray(clean["labels"]), float(clean["lr"])
  init, rng = ctx.evaluation_rngs(ctx.net, cfg.eval.num_seeds)
  sets = {"crafted": {"images": images, "labels": labels, "lr": lr}}
  _, params, _ = next(evaluate.train_on_sets(ctx.net.apply, cfg.dsa, cfg.eval, init, sets, rng))
  stamped = ctx.verifier().measure(params)
  v_pixels, v_pid = verify_queries
  _, y = ctx.patterns()
  answers = ctx.predictor(ctx.net.apply)(params, ctx.preprocess.pixels_to_inputs(v_pixels))
  key_p = [
    exact_tests.conditional_label_pvalue(
      exact_tests.pattern_counts(a, v_pid, len(y), len(np.unique(ctx.dataset.train_labels))),
      np.asarray(y),
    )
    for a in answers
  ]
  return {
    "acc": stamped["acc"],
    "acc_w_stamped": stamped["acc_w"],
    "p_stamped": stamped["p_values"],
    "acc_key": [float(np.mean(a == np.asarray(y)[v_pid])) for a in answers],
    "p_key": key_p,
  }


def main(argv=None):
  """Crafts, measures and writes the prototype's outputs under --root."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="A finished default run.")
  p.add_argument("--key_file", default=None)
  p.add_argument("--root", required=True)
  p.add_argument("--eps", type=float, default=0.1)
  p.add_argument("--iterations", type=int, default=60)
  p.add_argument("--queries", choices=("key", "stamped"), default="key")
  p.add_argument("--craft_epochs", type=int, default=150)
  p.add_argument("--nets", type=int, default=1)
  p.add_argument("--lr", type=float, default=0.02)
  p.add_argument("--w_clean", type=float, default=1.0)
  p.add_argument("--noise", type=float, default=0.05)
  p.add_argument("--archs", default="convnet")
  p.add_argument("--no_dsa_fraction", type=float, default=0.0)
  p.add_argument("--carriers", choices=("all", "target"), default="all")
  p.add_argument("--subset_fraction", type=float, default=1.0)
  p.add_argument("--subset_probability", type=float, default=0.0)
  args = p.parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  ctx = context.Context(loader.load("digits"), workdir, args.key_file or workdir / "owner.key")
  clean = workdir_lib.load_distilled(workdir, "clean_distilled")
  _, y = ctx.patterns()
  if args.queries == "key":
    pixels, pid = key_queries(ctx, args.noise, CRAFT_DRAWS, 16)
    queries = (
      jnp.asarray(ctx.preprocess.pixels_to_inputs(pixels)),
      jnp.asarray(np.asarray(y)[pid], jnp.int32),
    )
  else:
    wm_u8, wm_y = ctx.watermark_set
    queries = (jnp.asarray(ctx.preprocess.apply(wm_u8)), jnp.asarray(wm_y, jnp.int32))
  verify_queries = key_queries(ctx, args.noise, VERIFY_DRAWS, 30)
  images = craft(ctx, args, clean, queries)
  result = {"args": vars(args), **measure(ctx, images, clean, verify_queries)}
  root = pathlib.Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  pixels = ctx.preprocess.to_pixels(images)
  change = np.abs(pixels - ctx.preprocess.to_pixels(clean["images"]))
  result["pixel_change"] = {"max": float(change.max()), "mean": float(change.mean())}
  np.savez(
    root / "crafted.npz", images=images, labels=clean["labels"], lr=clean["lr"], pixels=pixels
  )
  ds = ctx.dataset
  np.savez(
    root / "queries.npz",
    q_pixels=verify_queries[0],
    q_pid=verify_queries[1],
    ylab=np.asarray(y),
    test_pixels=ds.test_images.astype(np.float32) / 255.0,
    test_labels=ds.test_labels,
  )
  (root / "result.json").write_text(json.dumps(result, indent=1))
  verified = {name: sum(p <= 1e-6 for p in result[f"p_{name}"]) for name in ("key", "stamped")}
  log(
    f"[craft] Acc {100 * np.mean(result['acc']):.1f}%, key queries "
    f"{100 * np.mean(result['acc_key']):.1f}% (verified {verified['key']}/5), stamped Acc_W "
    f"{100 * np.mean(result['acc_w_stamped']):.1f}% (verified {verified['stamped']}/5)"
  )


if __name__ == "__main__":
  main()
