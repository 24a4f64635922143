"""What every fgray command line shares: a parser whose errors are one line, and the
exit-code convention (0 success, 2 a user error printed as one line, 1 a bug with its
traceback). Imported by the `fgray` command (fgray/cli.py) and the study scripts
(fgray/tune/cli.py) alike, so neither imports the other."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fgray.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; a user mistake should be one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{self.prog}: {message}")


def run_main(fn: Callable[[], int], prog: str) -> int:
    """Run a command body: user errors become one line on stderr and exit code 2."""
    try:
        return fn()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
