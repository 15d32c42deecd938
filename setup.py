"""Install ccdd_jax: pip install -e '.[test]'."""
import setuptools

setuptools.setup(
    name="ccdd_jax",
    version="0.1.0",
    description=("Copyright-Certified Distillation Dataset (Liu et al., AAAI 2023) "
                 "in JAX: trajectory-matching distillation with a keyed backdoor watermark."),
    packages=setuptools.find_packages(include=["ccdd_jax", "ccdd_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax",
        "optax",
        "orbax-checkpoint",
        "chex",
        "numpy",
        "absl-py",
        "ml-collections",
        "scipy",
        "scikit-learn",
        "pillow",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # TFDS and TensorFlow (~1.7 GB, ~35 s to install) so that the TFDS
        # loader is tested with tfds.testing.mock_data and a prepared data dir.
        "test": ["pytest", "pytest-xdist", "tensorflow-datasets", "tensorflow-cpu"],
        "tfds": ["tensorflow-datasets", "tensorflow-cpu"],
        "cuda12": ["jax[cuda12]"],
        "bench": ["torch==2.13.0"],
    },
)
