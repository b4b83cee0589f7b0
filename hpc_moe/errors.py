"""The one base class of input errors.

An :class:`InputError` is something the user can fix: a bad flag value, a file that is not what it
should be, a layout that does not fit the world. The command line catches only this class and ends
the job with one line and exit status 2. Every other exception is a bug or a failure of the machine:
it propagates, and under ``python -m mpi4py`` aborts every rank instead of leaving them waiting.
"""
from __future__ import annotations

EXIT_INPUT = 2     # bad input: one line on stderr
EXIT_STOPPED = 3   # stopped by SIGTERM/SIGUSR1 after a whole step; the trace is closed as "stopped"
EXIT_WATCHDOG = 4  # a rank waited in communication longer than --watchdog


class InputError(Exception):
    """Bad input found after argument parsing; the message is the one line the user sees."""


class UsageError(InputError):
    """A combination of options or an input file that the job cannot use."""
