"""One codec between frozen dataclasses and plain JSON values.

``to_plain`` turns a dataclass (nested dataclasses, tuples, dicts, enums, numbers, strings,
None) into dicts, lists and scalars that ``json.dumps`` writes and ``json.loads`` reads back
identically. ``from_plain(cls, data)`` rebuilds the object from the field annotations of
``cls``: ``tuple[X, ...]``, fixed-length ``tuple[X, Y]``, ``Optional[X]``, ``dict[str, X]``,
enums (by value), nested dataclasses, ``int`` / ``float`` / ``str`` / ``bool`` / ``Any``.
Every field must be present and no other key may be; a mismatch raises ``CodecError``
naming the path of the value (e.g. ``ScoredTree.seeds[0].attacks[1].reward``) and what was
expected. Objects are rebuilt through their constructors, so their own checks run too.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from typing import Any, TypeVar

from advgame_jax.errors import UserError

T = TypeVar("T")


class CodecError(UserError, ValueError):
    """A plain value does not have the shape the dataclass field expects."""


# Exact types only: an enum member (a str or int subclass) is not a scalar here.
_SCALARS = frozenset({str, int, float, bool, type(None)})


@functools.lru_cache(maxsize=None)
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def to_plain(obj: Any) -> Any:
    """``obj`` as dicts (dataclasses, by field), lists (tuples), enum values and scalars."""
    cls = type(obj)
    if cls in _SCALARS:
        return obj
    if cls is tuple or cls is list:  # token ids and log-probs: most of a tree's values
        return [v if type(v) in _SCALARS else to_plain(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {name: to_plain(getattr(obj, name)) for name in _field_names(cls)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def from_plain(cls: type[T], data: Any, where: str = "") -> T:
    """The ``cls`` instance whose ``to_plain`` form is ``data`` (see module docstring)."""
    return _build(cls, data, where or cls.__name__)


def _fail(where: str, expected: str, data: Any) -> typing.NoReturn:
    raise CodecError(f"{where}: expected {expected}, got {type(data).__name__}")


def _build(tp: Any, data: Any, where: str) -> Any:
    if tp is Any:
        return data
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: only Optional[X] unions are supported, not {tp}")
        return _build(rest[0], data, where)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _dataclass(tp, data, where)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(data)
        except ValueError:
            raise CodecError(
                f"{where}: expected one of {[e.value for e in tp]}, got {data!r}"
            ) from None
    if origin is tuple:
        if not isinstance(data, (list, tuple)):
            _fail(where, "a list", data)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(data) != len(args):
            raise CodecError(f"{where}: expected a list of {len(args)} values, got {len(data)}")
        return tuple(
            _build(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, data, strict=True))
        )
    if origin is dict or tp is dict:
        if not isinstance(data, dict):
            _fail(where, "an object", data)
        value_tp = args[1] if args else Any
        return {k: _build(value_tp, v, f"{where}[{k!r}]") for k, v in data.items()}
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            _fail(where, "a number", data)
        return float(data)
    if tp in (int, str, bool):
        if not isinstance(data, tp) or (tp is int and isinstance(data, bool)):
            _fail(where, f"a {tp.__name__}", data)
        return data
    raise TypeError(f"{where}: cannot rebuild a value of type {tp}")


def _dataclass(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        _fail(where, f"an object with the fields of {cls.__name__}", data)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    missing = [n for n in names if n not in data]
    extra = sorted(set(data) - set(names))
    if missing or extra:
        raise CodecError(
            f"{where}: {cls.__name__} fields "
            + ", ".join(
                ([f"missing {missing}"] if missing else [])
                + ([f"unknown {extra}"] if extra else [])
            )
        )
    hints = _hints(cls)
    return cls(**{n: _build(hints[n], data[n], f"{where}.{n}") for n in names})
