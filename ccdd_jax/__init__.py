"""ccdd_jax: Copyright-Certified Distillation Dataset in JAX.

Errors. `CCDDError` is raised for what a user can fix: a bad config value, a
missing or corrupt input file, a stage run before its inputs exist, data
that cannot hold the requested set. Its message is one line that names the
problem, and `python -m ccdd_jax.main` prints it as `error: ...` and exits 1.
Misuse of the library's API by calling code (arrays of the wrong shape or
dtype, an unknown internal option, a function called out of order) raises
`ValueError` or `TypeError`, with a traceback, as any Python library does.
Config values are validated up front (`settings.validate`), so a user's bad
value is reported as a CCDDError before it can reach an API check.
`Preempted` is no error: a run stopped by a signal with its state saved.
"""


class CCDDError(Exception):
  """A user-facing error; `main` prints its one-line message and exits 1."""


class Preempted(Exception):
  """A stage stopped by SIGTERM or SIGINT at a step boundary, its state saved there.

  `point` says where in the stage ("at iteration 37 of 200"; "" between stages);
  the run fills in `stage` and `signal`. `python -m ccdd_jax.main` logs one line
  and exits with run/preemption.py's EXIT_CODE, not 1: nothing is wrong, rerun to resume.
  """

  def __init__(self, point: str, stage: str | None = None):
    super().__init__(point)
    self.point, self.stage, self.signal = point, stage, None
