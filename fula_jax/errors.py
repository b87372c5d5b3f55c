"""Errors in what a user asked for, as opposed to bugs.

Every error a user can cause by what they type or point at (an unknown name, a config key
that does not exist, a missing or damaged checkpoint, a dataset that is not prepared, two
points no stitch can connect) derives from :class:`UserError`. The command line prints
such an error as one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class UserError(Exception):
  """Something the user asked for cannot be done; the message says what and how to fix it."""


class ConfigError(UserError, ValueError):
  """A config value that is missing, of the wrong kind, or out of range."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during a resumable job; the message says what was kept and how to resume.
  A KeyboardInterrupt, so library code unwinds as it would for a plain one."""


def one_line(message: str) -> str:
  """`message` with its lines joined, for a terminal that shows one error line."""
  return " ".join(part.strip() for part in str(message).splitlines() if part.strip())
