"""One exception type for every user-facing error, and one for stop signals.

The CLI prints its message as a single line and exits non-zero; messages name the
file or run at fault and the problem, so nothing needs a traceback to be understood.
"""
import signal


class GlobScopeError(Exception):
    """A problem with the user's input (files, options, data), reported in one line."""


class Terminated(KeyboardInterrupt):
    """A stop signal other than Ctrl-C (SIGTERM: kill, a batch system's stop, torchrun; SIGHUP: a closed terminal),
    raised where the program is, as Ctrl-C raises KeyboardInterrupt: the same cleanup (temporaries removed, locks
    released, child programs stopped) and the same message. ``signum`` says which; the exit status is 128 + it."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__()
        self.signum = signum
