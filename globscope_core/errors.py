"""One exception type for every user-facing error.

The CLI prints its message as a single line and exits non-zero; messages name the
file or run at fault and the problem, so nothing needs a traceback to be understood.
"""


class GlobScopeError(Exception):
    """A problem with the user's input (files, options, data), reported in one line."""
