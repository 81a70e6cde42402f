"""The one exception type lmlab raises for bad input; the CLI prints it as a single line."""


class LmlabError(ValueError):
    """A problem the user can fix (bad config, missing file, wrong shape). Printed without a traceback."""


class Interrupted(LmlabError):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving what it had; exit status 130."""
