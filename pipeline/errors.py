"""The project's one exception type.

Every user-facing failure (a missing directory, a malformed CSV, a checkpoint that does not fit a
store) is raised as `GenealignError` with a one-line message that names the file, the row or column,
what was expected and what to do. The CLI prints it as one red line and exits 1; anything else that
escapes is a bug and keeps its traceback.
"""


class GenealignError(Exception):
    """A user's mistake or bad input, explained in one line."""


# The seed's scripts raised ValueError; code written against them may still catch that.
class GeneNotFoundError(GenealignError, ValueError):
    """A requested gene is not among the gene embedding files / store genes."""
