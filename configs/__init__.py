"""One get_config() file per setting; installed as the package ccdd_jax.configs."""
