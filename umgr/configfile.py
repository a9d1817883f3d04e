"""/etc/umgr/umgr.toml: the daemon's settings, read before its command line.

A setting is a long option of `umgr daemon` without its dashes, with the
option's own grammar and checks (sizes as strings, switches as booleans):

    max-resident = "512M"
    swap-size = "16G"
    state-dir = "/var/lib/umgr"
    group = "umgr"
    clean-copies = "always"
    backend = ["compressed:cap=1G", "file"]   # an option given more than once: a list

The settings become the parser's defaults, so an option given on the
command line wins. An unknown setting or a bad value is one line and exit
125, like a bad option. `umgr status` takes only `socket` from the file.
"""
from __future__ import annotations

import argparse
import os
import tomllib

from umgr.console import Fatal

DEFAULT_PATH = "/etc/umgr/umgr.toml"
NOT_SETTINGS = {"help", "config", "verbose_sub", "quiet_sub"}
UNSET = object()   # a setting that changes nothing


def load(path: str | None) -> tuple[str, dict]:
    """The file's path and settings: `path`, which must exist, or the
    default path, which may be absent (no settings)."""
    explicit = path is not None
    path = path or DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            return path, tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise Fatal(f"umgr: --config {path}: no such file") from None
        return path, {}
    except OSError as exc:
        raise Fatal(f"umgr: {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise Fatal(f"umgr: {path}: not TOML: {exc}") from None


def apply(settings: dict, parser: argparse.ArgumentParser, path: str, only: set[str] | None = None) -> None:
    """Make `settings` the defaults of `parser`'s options (those named in
    `only`, if given, and no others; then the rest are ignored)."""
    options = {name[2:]: action for action in parser._actions for name in action.option_strings
               if name.startswith("--") and action.dest not in NOT_SETTINGS}
    set_by: dict[str, str] = {}   # dest -> the key that set it
    for key, value in settings.items():
        if only is not None and key not in only:
            continue
        action = options.get(key)
        if action is None:
            raise Fatal(f"umgr: {path}: unknown setting {key!r} (the settings are the long options "
                        f"of `{parser.prog}`)")
        value = _value(action, key, value, path)
        if value is UNSET:
            continue
        if action.dest in set_by:   # (keep-clean and clean-copies; persist and no-persist, ...)
            raise Fatal(f"umgr: {path}: {set_by[action.dest]} and {key} are the same setting: give one")
        set_by[action.dest] = key
        parser.set_defaults(**{action.dest: value})


def _value(action: argparse.Action, key: str, value, path: str):
    if isinstance(action, argparse._AppendAction):  # given again on the command line: a list here
        values = value if isinstance(value, list) else [value]
        return [_one_value(action, key, item, path) for item in values]
    return _one_value(action, key, value, path)


def _one_value(action: argparse.Action, key: str, value, path: str):
    if action.nargs == 0:  # a switch such as --no-persist
        if not isinstance(value, bool):
            raise Fatal(f"umgr: {path}: {key} is true or false, not {value!r}")
        if isinstance(action, argparse._StoreTrueAction):
            return value
        if isinstance(action, argparse._StoreFalseAction):
            return not value
        # One that stands for another's value (keep-clean: clean-copies
        # "always"); false leaves that one as it is.
        return action.const if value else UNSET
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Fatal(f"umgr: {path}: {key} = {value!r} is not a string or number")
    text = str(value)
    try:
        typed = action.type(text) if action.type else text
    except (argparse.ArgumentTypeError, ValueError) as exc:
        raise Fatal(f"umgr: {path}: {key}: {exc}") from None
    if action.choices is not None and typed not in action.choices:
        raise Fatal(f"umgr: {path}: {key}: {typed!r} is not one of {', '.join(map(str, action.choices))}")
    return typed


def systemd_directory(variable: str, default: str) -> str:
    """A directory systemd made for the unit (RuntimeDirectory= sets
    $RUNTIME_DIRECTORY, StateDirectory= $STATE_DIRECTORY), else `default`."""
    return os.environ.get(variable, "").split(":")[0] or default
