"""The one exception type users see: a one-line message naming the problem and where."""


class NemoError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback.

    The CLI prints `error: <message>` and exits with status 2. Library callers can catch it.
    """

    exit_code = 2
