"""ccdd_jax: Copyright-Certified Distillation Dataset in JAX."""


class CCDDError(Exception):
  """A user-facing error; `main` prints its one-line message and exits 1."""
