"""Preprocessing: ZCA whitening (kornia's formulas), the Preprocessor and its caches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ccdd_jax import CCDDError
from ccdd_jax.data import preprocess


def _toy_images(n=400, side=4, channels=3, seed=0):
  """uint8 images whose pixels are correlated (a few shared factors plus noise)."""
  rng = np.random.default_rng(seed)
  d = side * side * channels
  factors = rng.normal(size=(n, 5)) @ rng.normal(size=(5, d))
  pixels = 128 + 20 * factors + 15 * rng.normal(size=(n, d))
  pixels = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
  return pixels.reshape(n, side, side, channels)


def _kornia_zca(train_u8, eps):
  """kornia ZCAWhitening written out from its formulas, with svd as kornia does."""
  x = train_u8.reshape(len(train_u8), -1).astype(np.float64) / 255.0
  mean = x.mean(axis=0)
  cov = (x - mean).T @ (x - mean) / (len(x) - 1)
  u, s, _ = np.linalg.svd(cov)
  transform = u @ np.diag(1.0 / np.sqrt(s + eps)) @ u.T
  inverse = u @ np.diag(np.sqrt(s + eps)) @ u.T
  whiten = lambda u8: ((u8.reshape(len(u8), -1) / 255.0 - mean) @ transform).reshape(u8.shape)
  unwhiten = lambda z: (z.reshape(len(z), -1) @ inverse + mean).reshape(z.shape)
  return whiten, unwhiten, cov, u, s


def test_zca_whitens_to_identity_covariance_as_eps_vanishes():
  x = _toy_images()
  pre = preprocess.fit_preprocessor(x, zca=True, zca_eps=1e-9)
  z = pre.apply(x)
  assert z.dtype == np.float32 and z.shape == x.shape
  flat = z.reshape(len(z), -1).astype(np.float64)
  np.testing.assert_allclose(flat.mean(axis=0), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.cov(flat, rowvar=False), np.eye(flat.shape[1]), atol=2e-3)


def test_zca_eps_shrinks_each_eigenvalue_to_s_over_s_plus_eps():
  x = _toy_images(seed=1)
  eps = 0.1
  _, _, _, u, s = _kornia_zca(x, eps)
  z = preprocess.fit_preprocessor(x, zca=True, zca_eps=eps).apply(x)
  cov = np.cov(z.reshape(len(z), -1).astype(np.float64), rowvar=False)
  np.testing.assert_allclose(u.T @ cov @ u, np.diag(s / (s + eps)), atol=1e-4)


def test_zca_matches_kornia_formulas_on_random_data():
  rng = np.random.default_rng(2)
  train = rng.integers(0, 256, (300, 4, 4, 3), dtype=np.uint8)
  other = rng.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
  whiten, unwhiten, _, _, _ = _kornia_zca(train, 0.1)
  pre = preprocess.fit_preprocessor(train, zca=True)  # MTT's eps, 0.1, is the default.
  assert pre.zca and pre.zca_eps == 0.1
  np.testing.assert_allclose(pre.apply(other), whiten(other), atol=1e-4)
  z = np.random.default_rng(3).normal(size=(5, 4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(pre.to_pixels(z, clip=False), unwhiten(z), atol=1e-5)
  np.testing.assert_allclose(pre.to_pixels(z), np.clip(unwhiten(z), 0, 1), atol=1e-5)


def test_zca_round_trips_to_pixels():
  x = _toy_images(seed=4)
  pre = preprocess.fit_preprocessor(x, zca=True, zca_eps=0.1)
  back = pre.to_pixels(pre.apply(x), clip=False)
  assert back.dtype == np.float32
  np.testing.assert_allclose(back, x / 255.0, atol=1e-5)
  # A single image [H, W, C] works too, and more rows than one chunk.
  np.testing.assert_allclose(pre.apply(x[0]), pre.apply(x[:1])[0], atol=1e-6)
  many = np.concatenate([x] * 11)  # 4,400 rows > preprocess._CHUNK
  out = pre.apply(many)
  # OpenBLAS rounding can depend on the row count of a matmul, so bitwise
  # equality holds chunk for chunk, and across row counts to float32 round-off.
  chunk = preprocess._CHUNK
  np.testing.assert_array_equal(
    out, np.concatenate([pre.apply(many[s : s + chunk]) for s in range(0, len(many), chunk)])
  )
  np.testing.assert_allclose(out[-len(x) :], pre.apply(x), rtol=0, atol=1e-6)


def test_preprocessor_without_zca_is_normalize():
  x = _toy_images(n=50, channels=1, seed=5)
  pre = preprocess.fit_preprocessor(x, zca=False)
  assert not pre.zca
  mean, std = preprocess.channel_stats(x)
  np.testing.assert_array_equal(pre.apply(x), preprocess.normalize(x, mean, std))
  z = pre.apply(x)
  np.testing.assert_allclose(pre.to_pixels(z), np.clip(z * std + mean, 0.0, 1.0), atol=1e-7)
  np.testing.assert_allclose(pre.to_pixels(z, clip=False), x / 255.0, atol=1e-6)


@pytest.mark.parametrize("zca", [False, True])
def test_the_traceable_transform_of_pixels_is_apply(zca):
  """Neural Cleanse's pixels -> inputs (jnp, under jit) is the transform `apply` uses."""
  x = _toy_images(n=40, seed=7)
  pre = preprocess.fit_preprocessor(x, zca=zca, zca_eps=0.2)
  traced = jax.jit(lambda p: pre.pixels_to_inputs(p, xp=jnp))(x.astype(np.float32) / 255.0)
  np.testing.assert_allclose(np.asarray(traced), pre.apply(x), rtol=1e-5, atol=1e-5)
  assert not np.allclose(pre.apply(x), x / 255.0, atol=1e-3)  # It transforms something.


@pytest.mark.parametrize("zca", [False, True])
def test_preprocessor_arrays_round_trip_through_npz(tmp_path, zca):
  x = _toy_images(n=60, seed=6)
  pre = preprocess.fit_preprocessor(x, zca=zca, zca_eps=0.2)
  path = tmp_path / "distilled.npz"
  np.savez(path, images=pre.apply(x[:3]), labels=np.arange(3), **pre.as_arrays())
  with np.load(path, allow_pickle=False) as f:
    loaded = preprocess.Preprocessor.from_arrays(f)
  assert loaded.zca == zca and loaded.zca_eps == pre.zca_eps
  np.testing.assert_array_equal(loaded.apply(x), pre.apply(x))
  z = pre.apply(x)
  np.testing.assert_array_equal(loaded.to_pixels(z), pre.to_pixels(z))


def test_preprocessor_bad_inputs():
  x = _toy_images(n=40)
  for eps in (0.0, -1.0):
    with pytest.raises(CCDDError, match="zca_eps"):
      preprocess.fit_preprocessor(x, zca=True, zca_eps=eps)
  pre = preprocess.fit_preprocessor(x, zca=True)
  with pytest.raises(CCDDError, match="48 values") as info:
    pre.apply(np.zeros((2, 5, 5, 3), np.uint8))
  assert "\n" not in str(info.value)
  arrays = pre.as_arrays()
  del arrays["zca_inverse"]
  with pytest.raises(CCDDError, match="zca_inverse"):
    preprocess.Preprocessor.from_arrays(arrays)
  with pytest.raises(CCDDError, match="preprocess_mean"):
    preprocess.Preprocessor.from_arrays({"images": x})


def test_zca_fit_cache(tmp_path, monkeypatch):
  x = _toy_images(n=80, seed=7)
  first = preprocess.fit_preprocessor(x, zca=True, cache_dir=str(tmp_path))
  assert len(list(tmp_path.glob("zca-*.npz"))) == 1

  def _fail(*args, **kwargs):
    raise AssertionError("fitted again instead of reading the cache")

  monkeypatch.setattr(preprocess, "_fit_zca", _fail)
  second = preprocess.fit_preprocessor(x, zca=True, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(second.zca_transform, first.zca_transform)
  np.testing.assert_array_equal(second.apply(x), first.apply(x))
  # Another eps or other images are another entry; no cache_dir, no cache.
  for kwargs in (dict(zca_eps=0.2), dict(cache_dir=None)):
    with pytest.raises(AssertionError):
      preprocess.fit_preprocessor(x, zca=True, **{"cache_dir": str(tmp_path), **kwargs})
  with pytest.raises(AssertionError):
    preprocess.fit_preprocessor(x[1:], zca=True, cache_dir=str(tmp_path))


def test_zca_cache_name_is_stable(tmp_path):
  """The cache key (CACHE_VERSION, shape, dtype, eps, pixels) is pinned: old entries stay valid."""
  x = (np.arange(40 * 48) * 7 % 256).astype(np.uint8).reshape(40, 4, 4, 3)
  preprocess.fit_preprocessor(x, zca=True, cache_dir=str(tmp_path))
  assert [p.name for p in tmp_path.iterdir()] == ["zca-767527bce792b17c.npz"]
