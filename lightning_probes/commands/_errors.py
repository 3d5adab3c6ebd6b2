"""One way for every command to turn bad input into one ``error:`` line and exit status 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["INPUT_ERRORS", "one_line_errors"]

#: Errors that mean "bad input" (arguments, config, checkpoint, data files), not a bug.
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, ConnectionError)


@contextmanager
def one_line_errors(command: str, errors: tuple[type[BaseException], ...] = INPUT_ERRORS) -> Iterator[None]:
    """Report a parse error (jsonargparse's ``ArgumentError``) or one of ``errors`` raised in the block as one
    ``error: ...`` line on stderr and exit with status 2 (``LIGHTNING_PROBES_DEBUG=1`` re-raises instead).

    A wrapped error (jsonargparse wraps a constructor's ``ValueError``) is reported by its innermost input-error
    cause, whose message says what is wrong; a parse error gets a hint to ``lightning-probes <command> --help``.

    Raises:
        SystemExit: 2, after writing the line.
    """
    from jsonargparse import ArgumentError

    try:
        yield
    except (ArgumentError, *errors) as err:
        if os.environ.get("LIGHTNING_PROBES_DEBUG"):
            raise
        while isinstance(err.__cause__, errors):
            err = err.__cause__
        message = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
        hint = f" (see lightning-probes {command} --help)" if isinstance(err, ArgumentError) else ""
        sys.stderr.write(f"error: {message}{hint}\n")
        raise SystemExit(2) from None
