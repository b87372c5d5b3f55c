"""Name lookup with errors that list the valid choices, closest match first."""

from __future__ import annotations

import difflib
from typing import Iterable, Mapping, TypeVar

from fula_jax.errors import UserError

V = TypeVar("V")


class UnknownNameError(UserError, KeyError, ValueError):
  """A name (model, dataset, layer, objective, job, ...) that is not registered."""

  def __str__(self) -> str:  # KeyError would otherwise quote the message.
    return str(self.args[0])


def suggest(name: str, valid: Iterable[str]) -> list[str]:
  """All valid names, the closest matches to `name` first."""
  valid = list(valid)
  close = difflib.get_close_matches(name, valid, n=len(valid), cutoff=0.0)
  return close + [v for v in valid if v not in close]


def unknown(kind: str, name: str, valid: Iterable[str], extra: str = ""
            ) -> UnknownNameError:
  ordered = suggest(str(name), valid)
  hint = f" Did you mean {ordered[0]!r}?" if ordered else ""
  extra = f", {extra}" if extra else ""
  return UnknownNameError(
      f"Unknown {kind} {name!r}.{hint} Valid choices: {', '.join(ordered)}{extra}.")


def lookup(kind: str, name: str, table: Mapping[str, V], extra: str = "") -> V:
  """`table[name]`, or an UnknownNameError naming the valid keys (and `extra`)."""
  try:
    return table[name]
  except (KeyError, TypeError):
    raise unknown(kind, name, table.keys(), extra) from None
