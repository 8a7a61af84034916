"""The one exception type for user mistakes (bad config, bad data, mismatched exports).

The command line prints its message as one paragraph and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says which file/sample/key and what is wrong."""
