"""Command-line flags declared once, on the frozen options dataclasses that carry them.

A field made by :func:`flag` holds its flag's help, choices, parse type and argparse group in its
metadata; :func:`add_flags` builds a parser's arguments from the fields and :func:`from_args` the
options from the parsed arguments, so a flag, its default and its option cannot disagree
(torchtitan generates its command line from its config dataclasses the same way). A field whose
default is itself an options dataclass (``RunOptions.layout``) contributes that class's flags.
Nothing here loads MPI: the command line imports the options while it parses.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING
from typing import Any


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a field appears on the command line. name: the option string (default ``--field-name``);
    positional: an argument without a dash; type: argparse's converter (default: the type of a
    non-None default, else str); group: the help section; exclusive: a mutually exclusive group
    (required when none of its members has a default)."""

    help: str | None = None
    choices: tuple | None = None
    type: Any = None
    metavar: str | None = None
    nargs: str | None = None
    group: str | None = None
    exclusive: str | None = None
    name: str | None = None
    positional: bool = False


def flag(default: Any = MISSING, *, help: str | None = None, choices=None, type=None, metavar: str | None = None,
         nargs: str | None = None, group: str | None = None, exclusive: str | None = None, name: str | None = None,
         positional: bool = False):
    """A dataclass field that is also a command-line flag (see :class:`Flag`); no default: required."""
    spec = Flag(help, tuple(choices) if choices is not None else None, type, metavar, nargs, group, exclusive, name,
                positional)
    return dataclasses.field(default=default, metadata={"flag": spec})


def positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def positive_list(text: str) -> tuple[int, ...]:
    return tuple(positive(t) for t in text.split(","))


def _nested(f: dataclasses.Field):
    """The options class a field's default is (its flags are the parent's), or None."""
    return type(f.default) if dataclasses.is_dataclass(f.default) else None


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """Every flag of the options dataclass ``cls`` (and of the options it nests), in field order."""
    sections: dict[str | None, Any] = {None: parser}
    exclusive: dict[str, Any] = {}
    members: dict[str, list] = {}
    for f in _flag_fields(cls):
        members.setdefault(f.metadata["flag"].exclusive, []).append(f)
    for f in _flag_fields(cls):
        spec: Flag = f.metadata["flag"]
        if spec.group not in sections:
            sections[spec.group] = parser.add_argument_group(spec.group)
        where = sections[spec.group]
        if spec.exclusive:
            if spec.exclusive not in exclusive:
                required = all(m.default in (None, MISSING) for m in members[spec.exclusive])
                exclusive[spec.exclusive] = where.add_mutually_exclusive_group(required=required)
            where = exclusive[spec.exclusive]
        where.add_argument(*_names(f, spec), **_kwargs(f, spec))


def _flag_fields(cls):
    for f in dataclasses.fields(cls):
        if _nested(f):
            yield from _flag_fields(_nested(f))
        elif "flag" in f.metadata:
            yield f


def _names(f: dataclasses.Field, spec: Flag) -> list[str]:
    if spec.positional:
        return [f.name]
    return [spec.name or "--" + f.name.replace("_", "-")]


def _kwargs(f: dataclasses.Field, spec: Flag) -> dict:
    kw = {"help": spec.help}
    if not spec.positional:
        kw["dest"] = f.name
    if f.default is MISSING:
        if not spec.positional:
            kw["required"] = True
    else:
        kw["default"] = f.default
    if isinstance(f.default, bool):  # a switch: given, it flips the default
        kw["action"] = "store_false" if f.default else "store_true"
        return kw
    kw["type"] = spec.type or (type(f.default) if isinstance(f.default, (int, float)) else str)
    for key in ("choices", "metavar", "nargs"):
        if getattr(spec, key) is not None:
            kw[key] = getattr(spec, key)
    return kw


def from_args(cls, args: argparse.Namespace, **given):
    """The options ``cls`` from parsed arguments (nested options built alike), but for the fields
    ``given``; lists that argparse gathered become tuples (the options are frozen)."""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            continue
        if _nested(f):
            values[f.name] = from_args(_nested(f), args)
        elif "flag" in f.metadata:
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values, **given)
