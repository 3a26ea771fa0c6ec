"""What every command line of the package shares: user errors end in ONE line and exit status 2.

A user error (a bad option, a missing or unwritable file, a config that does not hold, a run that will
not fit) prints `error: <what was wrong and what is allowed>` on stderr and exits with 2, before any
model loads where the options alone show it; a traceback is only for a real bug, or with `--debug`.

    parser = cli.ArgumentParser(prog="python -m stiv_core.generate")
    parser.add_argument("--fps", type=cli.positive_float)

    @cli.entry_point
    def main(argv=None): ...
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn, Optional, Sequence, TypeVar

from .memory.options import WontFitError

# What a user can cause and fix: bad values (ValueError, with ConfigError / CheckpointError / ConversionError),
# files (missing, unwritable, a folder where a file was meant: OSError), a run the memory plan refuses.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, WontFitError)
DEBUG_FLAG = "--debug"
T = TypeVar("T")


def fail(message: object) -> NoReturn:
    """Print `error: message` (one line: later lines of the message are joined) and exit with status 2."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    print(f"error: {' | '.join(lines) or type(message).__name__}", file=sys.stderr)
    raise SystemExit(2)


def entry_point(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a `main(argv=None)`: a user error (USER_ERRORS) raised inside is `fail`ed, unless the command
    line has --debug, which shows its traceback."""

    @functools.wraps(main)
    def wrapped(argv: Optional[Sequence[str]] = None, *args, **kwargs) -> T:
        given = sys.argv[1:] if argv is None else [str(a) for a in argv]
        try:
            return main(argv, *args, **kwargs)
        except USER_ERRORS as err:
            if DEBUG_FLAG in given:
                raise
            fail(err)

    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a --debug flag (tracebacks for user errors too) and usage errors as one line."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true", help="show the traceback of an error")

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


# argparse `type=` validators: the value, or ArgumentTypeError saying what is allowed (argparse names the option)

def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; {what}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "give a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be a whole number >= 1")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int, "give a whole number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be a whole number >= 0")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "give a number > 0")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g}: must be a number > 0")
    return value


def finite_float(text: str) -> float:
    return _number(text, float, "give a finite number")


def nonnegative_float(text: str) -> float:
    value = _number(text, float, "give a number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g}: must be a number >= 0")
    return value


def writable_output(path: str | os.PathLike, *, folder: bool = False, create: bool = True) -> Path:
    """Check that `path` (a file, or with `folder` a folder of outputs) can be written, before any work:
    missing parent folders are created (with `create`; said so on stderr); a clear OSError / ValueError
    otherwise."""
    path = Path(path)
    target = path if folder else path.parent
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file; give a folder (or a path that does not exist yet)")
    if not folder and path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a file path")
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write {str(path)!r}: {str(existing)!r} is a file, not a folder")
    try:   # by trying: permissions, a read-only disk and root's privileges are the file system's to judge
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise PermissionError(f"cannot write {str(path)!r}: the folder {str(existing)!r} is not writable "
                              f"({err.strerror or err})") from None
    if existing != target and create:
        target.mkdir(parents=True, exist_ok=True)
        print(f"created the folder {target}", file=sys.stderr)
    elif not folder and path.exists():
        try:
            open(path, "r+b").close()   # opened for writing, not changed
        except OSError as err:
            raise PermissionError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    return path
