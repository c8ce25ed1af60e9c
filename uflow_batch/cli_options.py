"""Click options generated from the fields of a config dataclass, and the dataclass built back from them.

A knob is defined once, in :mod:`uflow_batch.config`: its name, type, default
and help text (``metadata={"help": ...}``). A command that exposes a config
takes its options from here, so a new field becomes an option without an edit
to the CLI, and no default is ever typed a second time.

Each field ``some_name`` becomes ``--some-name`` (``metadata["option"]``
names it otherwise); ``X | None`` is an ``X`` option defaulting to None; a
``tuple[X, ...]`` is written comma-separated (``--categories a,b``), or
repeated where ``metadata["repeatable"]`` says so (``--input A --input B``);
a field with no default is a required option; a nested config dataclass
contributes its own fields, under their own names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Iterator
from typing import Any, TypeVar

import click

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class CommaSeparated(click.ParamType):
    """``a,b`` -> ``("a", "b")``, each item converted to ``item_type``; an empty value is None (the field's default)."""

    name = "list"

    def __init__(self, item_type: type) -> None:
        self.item_type = item_type

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple | None:
        if not value:
            return None
        try:
            return tuple(self.item_type(item) for item in str(value).split(",") if item)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item_type.__name__}", param, ctx)


def _without_none(hint: Any) -> Any:
    """``X | None`` (or ``Optional[X]``) -> ``X``; any other hint as it is."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def option_fields(config: type, skip: Collection[str] = ()) -> Iterator[tuple[dataclasses.Field, Any]]:
    """The (field, type hint) pairs that become options: every field but ``skip``, nested configs flattened.

    Required fields come first, so ``--help`` lists what must be given before what may be.
    """
    hints = typing.get_type_hints(config)
    pairs: list[tuple[dataclasses.Field, Any]] = []
    for f in dataclasses.fields(config):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            pairs.extend(option_fields(hints[f.name], skip))
        else:
            pairs.append((f, hints[f.name]))
    return iter(sorted(pairs, key=lambda pair: not _is_required(pair[0])))


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _option(f: dataclasses.Field, hint: Any) -> Callable[[F], F]:
    if "help" not in f.metadata:
        raise TypeError(f"config field {f.name!r} has no help text: give it metadata={{'help': ...}}")
    base = _without_none(hint)
    default = None if _is_required(f) else f.default
    kwargs: dict[str, Any] = {"help": f.metadata["help"], "required": _is_required(f), "default": default,
                              "show_default": default is not None}
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        kwargs.update({"multiple": True, "type": item} if f.metadata.get("repeatable") else {"type": CommaSeparated(item)})
    elif base in (int, float, str):
        kwargs["type"] = base
    else:
        raise TypeError(f"config field {f.name!r}: no option type for {hint!r}")
    return click.option(f.metadata.get("option", "--" + f.name.replace("_", "-")), f.name, **kwargs)


def config_options(config: type, skip: Collection[str] = ()) -> Callable[[F], F]:
    """Decorate a click command with an option for each field of ``config`` but ``skip``.

    Fails at import time, not when a user asks for ``--help``, on a field with
    no help text or a type it cannot offer.
    """
    options = [_option(f, hint) for f, hint in option_fields(config, skip)]

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def config_from_options(config: type[T], options: dict[str, Any], **given: Any) -> T:
    """Build ``config`` from a command's parsed options, taking (popping) the ones that are its fields.

    ``given`` sets fields that have no option (or whose value the command
    decides); fields with neither keep their dataclass default.
    """
    hints = typing.get_type_hints(config)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in given:
            kwargs[f.name] = given[f.name]
        elif dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = config_from_options(hints[f.name], options)
        elif f.name in options:
            kwargs[f.name] = options.pop(f.name)
    return config(**kwargs)
