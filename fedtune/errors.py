"""User-facing errors.

A :class:`ConfigError` is a user mistake (bad override, impossible value, missing file, wrong
column). Its message is ONE line that names the key or file and says how to fix it; the CLI prints
it without a traceback and exits with code 2. Programmer invariants use ``assert`` instead.
"""


class ConfigError(ValueError):
    """A bad user input. The message names the key or file and the fix, on one line."""
