"""Argument checks every CLI in experiments/ shares: everything is checked before any
work starts (before a model loads), and a bad argument exits 2 with one clear line
(`Parser.error`), never a traceback after the work.

- `Parser`: an `argparse.ArgumentParser` whose errors are one line ("prog: error: ...").
- argparse types: `count` (an integer >= 1), `nonneg` (>= 0), `fraction` (in [0, 1)),
  `positive_float`.
- `output_file` / `output_dir` / `text_file`: paths checked and, for a text file, read.
- `checked_config`: a registered config with `--set` overrides, each known and typed.
- `net_paths`: the params files and training workdirs the GistNet / LensNet options name
  exist (what they hold is `mcjax.nets`' to check, when the nets are resolved).
- `no_negative_ints`: every plain `type=int` option of a parser is >= 0.

The library (mcjax/) stays argparse-free: its own checks are `mcjax.checks`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    """One line and exit 2 (as `Parser.error`, for any parser)."""
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _int(text: str, least: int, what: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < least:
        raise argparse.ArgumentTypeError(f"{what} {n} must be >= {least}")
    return n


def count(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int(text, 1, "count")


def nonneg(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int(text, 0, "value")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= x < 1.0:
        raise argparse.ArgumentTypeError(f"{x} is not in [0, 1)")
    return x


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"{x} must be > 0")
    return x


def _writable_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of `path`, when it is a writable directory."""
    p = path.absolute().parent
    while not p.exists():
        p = p.parent
    return p if p.is_dir() and os.access(p, os.W_OK | os.X_OK) else None


def output_file(parser: argparse.ArgumentParser, path: str, flag: str) -> Path:
    """`path` can be written as a file: not a directory, its folder writable (created
    later by the writer when missing)."""
    p = Path(path)
    if p.is_dir():
        fail(parser, f"{flag} {path}: is a directory, not a file")
    if p.exists() and not os.access(p, os.W_OK):
        fail(parser, f"{flag} {path}: not writable")
    if _writable_ancestor(p) is None:
        fail(parser, f"{flag} {path}: its folder cannot be written")
    return p


def output_dir(parser: argparse.ArgumentParser, path: str, flag: str) -> Path:
    """`path` is, or can be created as, a writable directory (not a file)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        fail(parser, f"{flag} {path}: exists and is not a directory")
    if p.is_dir() and not os.access(p, os.W_OK | os.X_OK):
        fail(parser, f"{flag} {path}: not writable")
    if not p.exists() and _writable_ancestor(p) is None:
        fail(parser, f"{flag} {path}: cannot be created")
    return p


def text_file(parser: argparse.ArgumentParser, path: str, flag: str) -> str:
    """The UTF-8 text of the file `path` (missing, a directory, unreadable or binary:
    one clear line, exit 2)."""
    p = Path(path)
    if not p.exists():
        fail(parser, f"{flag} {path}: no such file")
    if not p.is_file():
        fail(parser, f"{flag} {path}: not a regular file")
    try:
        data = p.read_bytes()
    except OSError as e:
        fail(parser, f"{flag} {path}: cannot be read ({e.strerror})")
    if b"\0" in data:
        fail(parser, f"{flag} {path}: a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(parser, f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})")


def checked_config(parser: argparse.ArgumentParser, name: str, overrides):
    """`get_config(name, overrides)`: an unknown config, an unknown field or a value of
    the wrong type or range is one clear line, exit 2."""
    from mcjax.config import ConfigError, get_config

    try:
        return get_config(name, overrides)
    except ConfigError as e:
        fail(parser, str(e).splitlines()[0] if str(e) else "invalid config")


def net_paths(parser: argparse.ArgumentParser, args: argparse.Namespace, *,
              files: tuple[str, ...] = (), workdirs: tuple[str, ...] = ()) -> None:
    """Each given option of `files` (dests: params-only files, e.g. "gist_params") is a
    file and each of `workdirs` (training workdirs, e.g. "gist_checkpoint") a directory:
    else one clear line, exit 2, before any model loads."""
    for dest in files:
        path = getattr(args, dest, None)
        if path is not None and not os.path.isfile(path):
            fail(parser, f"--{dest.replace('_', '-')} {path}: no such file")
    for dest in workdirs:
        path = getattr(args, dest, None)
        if path is not None and not os.path.isdir(path):
            fail(parser, f"--{dest.replace('_', '-')} {path}: not a directory")


def no_negative_ints(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     allowed: tuple[str, ...] = ()) -> None:
    """Every option declared with plain `type=int` (except `allowed` dests) holds no
    negative number: counts, sizes, lengths and seeds."""
    for action in parser._actions:
        if action.type is not int or action.dest in allowed:
            continue
        value = getattr(args, action.dest, None)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and v < 0:
                fail(parser, f"{'/'.join(action.option_strings)} {v} must be >= 0")
