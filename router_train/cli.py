"""How the command-line tools report a user's mistake: one `error: ...` line on stderr and exit status 2
(as argparse does), no traceback unless `--debug`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager

USER_ERRORS = (ValueError, OSError)
"""Bad arguments, tables, configs or checkpoints (ValueError) and paths that are missing, taken or not
writable (OSError: FileNotFoundError, FileExistsError, PermissionError, ...)."""
EXIT_USER_ERROR = 2


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """The `--debug` flag: show the traceback of a user error instead of the one-line message."""
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")


@contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Turn a user error raised in the block into `error: <message>` on stderr and exit status 2."""
    try:
        yield
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None
