"""How the umgr command talks to people: one-line errors and exit status 125
for umgr's own failures, argument types that refuse bad values before
anything starts, and log lines with time and level."""
from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import time

from umgr.sizes import SizeError, parse_size

# umgr's own failure, as env(1) and timeout(1) report theirs: a program run
# by `umgr exec` keeps its status (126 cannot run, 127 not found, 128+N).
EXIT_UMGR = 125


class Fatal(Exception):
    """umgr cannot go on; str() is the one line to show."""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line and exit 125, and which
    takes an argument that starts with '-' and a digit for a value: an
    option's (`--max-resident -5M`) or a positional's (`umgr budget PID
    -1M`), so that the value's own check refuses it by name. argparse reads
    such a token as a value only if it looks like a number ('-1', '-1.5'),
    and otherwise as an unknown option ("expected one argument", "the
    following arguments are required"). No umgr option looks like one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str):
        raise Fatal(f"{self.prog}: {message} (see {self.prog} --help)")


def reason(exc: BaseException) -> str:
    """What went wrong, without the exception's class or errno number."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


@contextlib.contextmanager
def setting_up(what: str):
    """An OSError while setting `what` up is a Fatal line."""
    try:
        yield
    except OSError as exc:
        raise Fatal(f"{what}: {reason(exc)}") from None


def fatal_in(exc: BaseException) -> Fatal | None:
    """The Fatal error behind `exc`, which trio may have wrapped in
    exception groups with nothing else in them."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, Fatal) else None


# ---- argument types ------------------------------------------------------------
class AppendOverDefault(argparse._AppendAction):
    """action="append" whose first value on the command line replaces the
    default (the config file's list: options given there lose to the
    command line's), where argparse's own appends to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:   # (argparse copies the list once appended to)
            setattr(namespace, self.dest, [])
        super().__call__(parser, namespace, values, option_string)


def size_arg(text: str) -> int:
    """A size in umgr's grammar (umgr.sizes), at least a page."""
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def budget_size_arg(text: str) -> int:
    """A budget's size: at least MIN_BUDGET_BYTES."""
    from umgr.paging.budget import MIN_BUDGET_BYTES
    size = size_arg(text)
    if size < MIN_BUDGET_BYTES:
        raise argparse.ArgumentTypeError(f"{text!r}: a budget is at least {MIN_BUDGET_BYTES >> 10}K")
    return size


def port_arg(text: str) -> int:
    """A TCP port to listen on: 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return port


def seconds_arg(text: str) -> float:
    """A duration in seconds, more than zero."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


# ---- logging ---------------------------------------------------------------------
def add_verbosity(parser: argparse.ArgumentParser, where: str) -> None:
    """-v and -q, counted separately before and after the subcommand (where
    is 'top' or 'sub') so both places add up."""
    parser.add_argument("-v", "--verbose", action="count", default=0, dest=f"verbose_{where}",
                        help="say more (repeat for debug detail)")
    parser.add_argument("-q", "--quiet", action="count", default=0, dest=f"quiet_{where}",
                        help="say less: errors only (umgr daemon, whose default shows what it does: "
                             "once for warnings and errors, twice for errors only)")


def setup_logging(args: argparse.Namespace, default: int = logging.WARNING) -> int:
    """Log to stderr with UTC time and level; returns the verbosity (-v count
    minus -q count)."""
    verbosity = (getattr(args, "verbose_top", 0) + getattr(args, "verbose_sub", 0)
                 - getattr(args, "quiet_top", 0) - getattr(args, "quiet_sub", 0))
    level = min(max(default - 10 * verbosity, logging.DEBUG), logging.ERROR)
    handler = logging.StreamHandler(sys.stderr)
    formatter = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s",
                                  datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return verbosity
