"""The one exception type the CLI turns into a one-line message (no traceback)."""


class CxrError(Exception):
    """A problem the user can fix: the message names the file or option and what to do next."""
