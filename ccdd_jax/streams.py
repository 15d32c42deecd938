"""Every random stream of a run, in one table: what a seed reproduces, and where.

A run draws all of its randomness from `config.seed` (s) through two kinds of
stream, each named by a fixed number (a number is part of what a seed
reproduces, so numbers are never reused or renumbered):

  numpy    np.random.default_rng([s, number, *sub])      `numpy_rng`
  JAX      jax.random.fold_in(PRNGKey(s), number)        `jax_key`

  stream          kind   number  draws                                 used by
  WATERMARK_SET   numpy  1       which training images carry which     watermark.
                                 pattern in D_W                        make_watermark_set
  PRUNE_IMAGES    numpy  2       the clean images that rank channels   run.context
                                 for eq. 7                             (experts' inputs)
  INITIAL_SET     numpy  3       the real images each synthetic set    embedding.initial_set
                                 starts from
  VERIFY_QUERIES  numpy  5, k    network k's verification queries      verify.Verifier
                                 (m held-out images per pattern)
  CARRIERS        numpy  6       the carriers' source images and the   embedding.add_carriers,
                                 order of the classes they come from   embedding.appended_set
  MODEL_ATTACKS   numpy  11      --stage=attacks on the networks       threats.suite.run_suite
  DATA_THREATS    numpy  12      --stage=attacks on the distilled data threats.data_suite.run
  EXPERTS         JAX    1       experts' initial parameters, batches  pipeline.stage_experts
  DISTILL         JAX    2       each distillation iteration's expert, distill.distill
                                 start epoch, minibatches and DSA
  EVAL_INIT       JAX    3       evaluated networks' initial params    context.evaluation_rngs
  EVAL_BATCHES    JAX    4       evaluated networks' batches and DSA   context.evaluation_rngs
  CRAFT           JAX    5       the "clean_label" crafting: each      sets.craft_set
                                 iteration's network, batches, DSA

Inside the method, a function splits or folds the key it is given; those
streams are its own and are named where they are drawn:
  experts.train_kinds_resumable    fold_in(key, group index), then split per epoch
  trajectory_pairs.make_pair_sampler  split(key, 3): expert, start epoch, the update's key;
                                   fold_in(key, CLEAN_POOL): whether a clean expert replaces it
  trajectory_pairs.pair_keys       with distill.pairs_per_iteration = k > 1: split(key, k), pair
                                   p's key, drawn and used as an iteration's key is (k = 1: the key)
  distill.make_meta_loss           fold_in(key, DIRECT_OBJECTIVE): the direct objective's batches
  suite.run_suite                  fold_in(key, ATTACK_INIT): the extraction's fresh networks;
                                   fold_in(key, attack index): each attack
  model_attacks._train_path        fold_in(key, epoch): each attack epoch
  crafting.craft                   fold_in(key, iteration), split(2): the fresh network, the step;
                                   the step splits(3): its batches, DSA families, real batch
  data_suite.run                   fold_in(key, 0 / 1): the pirate's model's init / batches;
                                   fold_in(key, 2 / 3 / 4): Neural Cleanse, the cleansers'
                                   models, drop_random (then fold_in(., fraction index))
"""

import jax
import numpy as np

WATERMARK_SET = 1
PRUNE_IMAGES = 2
INITIAL_SET = 3
VERIFY_QUERIES = 5
CARRIERS = 6
MODEL_ATTACKS = 11
DATA_THREATS = 12

EXPERTS = 1
DISTILL = 2
EVAL_INIT = 3
EVAL_BATCHES = 4
CRAFT = 5

# Streams folded into a key a method function is given.
CLEAN_POOL = 7
DIRECT_OBJECTIVE = 7
ATTACK_INIT = 99


def numpy_rng(seed: int, stream: int, *sub: int) -> np.random.Generator:
  """The numpy generator of one stream of the table (`sub`: e.g. a network's index)."""
  return np.random.default_rng([seed, stream, *sub])


def jax_key(seed: int, stream: int) -> jax.Array:
  """The JAX key of one stream of the table."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream)


def key_bits(key: jax.Array) -> np.ndarray:
  """The uint32 words of a PRNG key (raw or typed): what a checkpoint stores to name its seed."""
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  return np.asarray(jax.random.key_data(key) if typed else key)
