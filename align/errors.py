"""The one exception type for errors a user can cause (bad config, missing file, unknown model, ...).

The CLI prints its message on one line and exits with code 2; the message must say what to do instead.
"""


class AlignError(Exception):
    """A user-facing error: its message is shown as is, without a traceback."""
