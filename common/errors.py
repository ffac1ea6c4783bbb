"""The one base of every error a user can fix: a bad setting, a missing or unfitting input.

``msmoe`` catches :class:`UserError` (launcher/cli.py), prints its message as one line and exits 2;
any other exception is a bug or a crash and keeps its traceback. A user error's message says what is
wrong and how to fix it. Subclasses keep the builtin base callers already catch, e.g.
``class DataError(UserError, ValueError)``, so ``except ValueError`` still holds.
"""

from __future__ import annotations


class UserError(Exception):
    """A bad setting or input that the user can fix; the message names it and the fix."""
