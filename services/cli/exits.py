"""How a `tokenmesh` command ends when it cannot do its work: the CLI's exit codes.

Every error is one `tokenmesh: ...` line on stderr, and the code tells a script
which side has to change:

- FAILED (1): a service or Redis answered with an error or not at all, or no
  local mesh runs where the CLI looks for one. The same command may work later.
- BAD_INPUT (2, as argparse exits for a bad argument): input the command cannot
  use, found before anything is sent: a malformed value, a file it cannot
  read, a credential it was not given. The same command never works.

Commands raise `BadInput` or `Failed`; `main` prints the line and returns the
code. Both are SystemExit, so a command called outside `main` still ends the
process with the line (as Python prints a SystemExit's text, with code 1).
"""

from __future__ import annotations

import argparse

from tokenmesh.client import clean_token

FAILED = 1
BAD_INPUT = 2


class CommandError(SystemExit):
    """CommandError ends a command with `tokenmesh: <message>` and `exit_code`."""

    exit_code = FAILED

    def __init__(self, message: str) -> None:
        # One line whatever an exception's text in it holds (protobuf's ParseError
        # lists the known fields on a second one): scripts read stderr by line.
        line = " ".join(part.strip() for part in message.splitlines())
        super().__init__(f"tokenmesh: {line}")

    def line(self) -> str:
        """Returns the line printed on stderr."""
        return str(self)


class Failed(CommandError):
    """Failed: a service or Redis failed, or the mesh to talk to is not running."""


class BadInput(CommandError):
    """BadInput: input the command cannot use, refused before anything is sent."""

    exit_code = BAD_INPUT


INTERRUPTED = 130  # as a shell reports a command ended by Ctrl-C (128 + SIGINT)


def positive_int(text: str) -> int:
    """An argparse type: a whole number above 0 (0 meant "none" to the request, which
    made `--ttl 0` a key that never expires)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value}")
    return value


def credential(value: str, source: str) -> str:
    """Returns an API key as sent (surrounding whitespace dropped); BadInput for one that
    cannot be a header value (a newline inside), before anything is sent."""
    try:
        return clean_token(value)
    except ValueError:
        raise BadInput(
            f"the API key from {source} is not one line of printable characters"
        ) from None
