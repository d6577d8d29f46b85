"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class PfgenError(Exception):
    """A problem the user can fix: the message names it, the hint says how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message
