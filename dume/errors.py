"""One exception type for problems the user can fix (bad flags, missing files, mismatched experts): scripts print
its message and exit with status 2 instead of a traceback (`dume.cli.run_main`), before any heavy work starts."""


class DumeError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
