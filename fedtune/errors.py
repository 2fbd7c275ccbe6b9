"""User-facing errors.

A :class:`ConfigError` is a user mistake (bad override, impossible value, missing file, wrong
column). Its message is ONE line that names the key or file and says how to fix it; the CLI prints
it without a traceback and exits with code 2. Programmer invariants use ``assert`` instead.
"""


class ConfigError(ValueError):
    """A bad user input. The message names the key or file and the fix, on one line."""


class WorkerError(RuntimeError):
    """A parallel worker failed, died or hung. The message is one line naming the worker and when;
    the CLI prints it without a traceback and exits with code 3."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run: where it stopped and how to continue (the CLI prints it, exit code 130)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
