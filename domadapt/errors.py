"""The one exception type for mistakes a user can cause.

Raise `UserError("one line naming the path, name or option at fault")` anywhere in the
library; the CLI turns it into that single line on stderr and a non-zero exit, no traceback.
"""


class UserError(Exception):
    """A problem with the user's input (path, name, option, file contents), not a bug."""
