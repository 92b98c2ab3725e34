"""The one exception type for mistakes a user can cause.

Raise `UserError("one line naming the path, name or option at fault")` anywhere in the
library; the CLI turns it into that single line on stderr and a non-zero exit, no traceback:
`exit_code`, 1 for a failure at run time, 2 (click's convention) for a `UsageError`.
"""


class UserError(Exception):
    """A problem with the user's input (path, name, option, file contents), not a bug."""

    exit_code = 1


class UsageError(UserError):
    """What the command line asked for cannot be done (a bad option value or combination),
    found before any work starts."""

    exit_code = 2
