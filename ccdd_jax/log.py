"""The one log function: progress for people, on stderr, from every layer."""

import sys


def log(message: str) -> None:
  """Progress for people, on stderr."""
  print(message, file=sys.stderr, flush=True)
