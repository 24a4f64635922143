"""Errors a user can cause. The CLI and the studies print them as one line and exit 2."""


class UserError(Exception):
    """A mistake in the user's input: a path, a layout, a flag, a range, a missing extra."""

    exit_code = 2

    def __str__(self) -> str:
        # One line, always: a multi-line message would read like a traceback.
        return " ".join(super().__str__().split())
