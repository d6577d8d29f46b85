"""The exception types the CLI turns into a one-line message and a non-zero exit."""


class PfgenError(Exception):
    """A problem the user can fix: the message names it, the hint says how."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP stopped a run; `kept` says what it kept (its video up to its last saved state),
    None when it kept nothing. (Typer turns a KeyboardInterrupt into a bare exit code; this one reaches the CLI's
    error line.)"""

    def __init__(self, kept: str | None):
        super().__init__(kept)
        self.kept = kept
