"""Run settings declared once: a dataclass field with its default, its help text and its range.

`setting(default, "help", minimum=..., choices=...)` is the one place a setting is defined. The CLI builds
its flags and `--help` from these fields, the notebook and the demo override them by name, and
`check_settings` validates every value (type, finiteness, range, choices) with one-line errors, so a
config built from Python, a flag or a JSON file is checked the same way. A `tuple[X, ...]` field is a
repeatable setting (a flag given once per item); a dataclass-typed field nests another settings object.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any

from parti.errors import PartiError

# Integers a setting may hold: seeds, steps and counts all fit torch's int64 generators and counters.
INT_LIMIT = 2**63 - 1


def setting(default: Any = dataclasses.MISSING, help: str = "", *, choices: tuple | None = None,
            minimum: float | None = None, maximum: float | None = None, above: float | None = None,
            required: bool = False, flag: str | None = None, positional: bool = False) -> Any:
    """A dataclass field: `minimum`/`maximum` are inclusive bounds, `above` an exclusive lower bound (of each
    item, for a `tuple[X, ...]` field); `required` (with a None default): the value must be given (a required
    flag on the command line). `flag`: the command line's name when it is not --FIELD-NAME (`--prompt` for a
    repeatable `prompts`); `positional`: a positional argument on the command line instead of a flag.

    A field that redeclares a parent's field with another default may leave `help` and bounds empty: they
    are inherited (`field_info`)."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "above": above,
            "required": required or None, "flag": flag, "positional": positional or None}
    return dataclasses.field(default=default, metadata={k: v for k, v in meta.items() if v not in (None, "")})


def field_info(cls: type, name: str) -> dict[str, Any]:
    """The metadata of `name`, merged from `cls`'s parents to `cls` (a child's bounds override)."""
    info: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata:
            info.update(f.metadata)
    return info


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations (`from __future__ import annotations` leaves strings)."""
    return typing.get_type_hints(cls)


def flag_name(cls: type, name: str) -> str:
    """How the command line spells field `name` of `cls`: --num-images, or its `setting(flag=...)`."""
    return field_info(cls, name).get("flag") or "--" + name.replace("_", "-")


def item_type(hint: Any) -> type | None:
    """The item type X of a repeatable setting `tuple[X, ...]`; None for any other hint."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def base_type(hint: Any) -> tuple[type, bool]:
    """(the value type, whether None is allowed) of a hint such as `int`, `float | None`, `str | None`;
    `tuple` for a repeatable `tuple[X, ...]` (see `item_type`)."""
    if item_type(hint) is not None:
        return tuple, False
    args = typing.get_args(hint)
    if args:
        kinds = [a for a in args if a is not type(None)]
        return kinds[0], len(kinds) < len(args)
    return hint, False


def check_settings(obj: Any) -> None:
    """Raise a one-line PartiError for the first field of dataclass `obj` that breaks its declaration.
    Errors name the field as Python and the command line spell it: `num_images (--num-images)`."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value, (kind, optional) = getattr(obj, f.name), base_type(hints[f.name])
        info = field_info(type(obj), f.name)
        name = f"{f.name} ({flag_name(type(obj), f.name)})"
        if dataclasses.is_dataclass(kind):
            continue  # a nested settings object checks itself
        if value is None:
            if not optional or info.get("required"):
                raise PartiError(f"{name} must be given")
            continue
        if kind is tuple:
            value = _check_items(name, value, item_type(hints[f.name]), info)
        else:
            if kind is str and isinstance(value, os.PathLike):
                value = os.fspath(value)  # a Path where a folder name is asked for
            _check_value(name, value, kind, info)
        if value is not getattr(obj, f.name):
            object.__setattr__(obj, f.name, value)  # the normalised value (frozen dataclasses too)


def _check_items(name: str, value: Any, kind: type, info: dict[str, Any]) -> tuple:
    """A repeatable setting: a list or tuple (not a lone string) whose every item is checked; -> a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise PartiError(f"{name} must be a list, got {value!r}")
    items = tuple(os.fspath(v) if kind is str and isinstance(v, os.PathLike) else v for v in value)
    for item in items:
        _check_value(f"{name} item", item, kind, info)
    return items


def _check_value(name: str, value: Any, kind: type, info: dict[str, Any]) -> None:
    if kind is bool:
        if not isinstance(value, bool):
            raise PartiError(f"{name} must be true or false, got {value!r}")
        return
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PartiError(f"{name} must be a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PartiError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise PartiError(f"{name} must be a finite number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise PartiError(f"{name} must be text, got {value!r}")
    if kind is int and abs(value) > INT_LIMIT:
        raise PartiError(f"{name} is out of range ({value}); use a number below 2**63")
    choices = info.get("choices")
    if choices is not None and value not in choices:
        raise PartiError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    low, high, above = info.get("minimum"), info.get("maximum"), info.get("above")
    if low is not None and value < low:
        raise PartiError(f"{name} must be >= {low}, got {value}")
    if above is not None and value <= above:
        raise PartiError(f"{name} must be > {above}, got {value}")
    if high is not None and value > high:
        raise PartiError(f"{name} must be <= {high}, got {value}")
