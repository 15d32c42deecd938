"""Comma-separated config lists ("1, 10,50"; "convnet,alexnet"), read one way for every layer."""

from collections.abc import Callable
from typing import Any

from ccdd_jax import CCDDError


def parse_list(value, kind: type = str) -> tuple:
  """A comma-separated string (or a tuple / list) as a tuple of `kind`; "" is ()."""
  items = value.split(",") if isinstance(value, str) else list(value)
  items = [item.strip() if isinstance(item, str) else item for item in items]
  out = []
  for item in items:
    if item == "" or kind is str:
      out += [item] if item != "" else []
      continue
    number = float(item)  # Raises ValueError for what is no number.
    if kind is int and number != int(number):
      raise ValueError(f"{item!r} is not an integer")
    out.append(kind(number))
  return tuple(out)


def named_list(listing: str, default: str, field: str, parse: Callable[[str], Any]) -> list[str]:
  """The names a comma-separated `listing` holds ("" = [`default`]), in order.

  `parse` reads one name and raises CCDDError for a bad one; the error is re-raised as one
  line that names `field` and the entry. Two entries that parse alike are refused.
  """
  names = list(parse_list(listing)) or [default]
  seen = {}
  for name in names:
    try:
      parsed = parse(name)
    except CCDDError as e:
      raise CCDDError(f"{field} entry {name!r}: {e}") from e
    if parsed in seen:
      raise CCDDError(f"{field} lists {seen[parsed]!r} twice (as {name!r}): {listing!r}")
    seen[parsed] = name
  return names
