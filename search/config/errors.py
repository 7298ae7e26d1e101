"""The one exception type for mistakes a user can make (bad overrides, missing data, ...).

Raised anywhere in the package with a message written for people; the command-line entry
points turn it into a clean non-zero exit with no traceback.
"""


class SearchError(Exception):
    """A problem the user can fix; the message says what is wrong and what is allowed."""


def first_line(error: BaseException) -> str:
    """An error's message as one line for a person (drivers add pages of SQL and traceback);
    the error's type where it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def shown(value: object, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short (a 4000-digit number or a long
    list would bury the message)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
