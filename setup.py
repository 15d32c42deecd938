"""Install ccdd_jax: pip install -e '.[test]' (metadata in pyproject.toml)."""

import setuptools

setuptools.setup()
