"""TOML into frozen dataclasses, in one place, with errors that name file, key and fix.

Both the appliance config and each model's config.toml are read through ``from_mapping``:
a field's type annotation says what is allowed; an unknown key or a value of the wrong
type is a ConfigError naming the file, the dotted key and what would be accepted.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path

from appliance.errors import ConfigError, OutpostError


def read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: can't be read: {exc.strerror}") from exc


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value, tp, key: str, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:  # an optional field: its own type's error says what is wrong
            return _convert(value, args[0], key, where)
        for arg in args:
            try:
                return _convert(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: '{key}' is {value!r}; it must be {_type_name(tp)}")
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be {_type_name(tp)}, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table, got {value!r}")
        _k, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a table, got {value!r}")
        return from_mapping(tp, value, where, prefix=f"{key}.")
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and type(value) is int)
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise ConfigError(f"{where}: '{key}' is {value!r}; it must be {_type_name(tp)}")
    return float(value) if tp is float else value


def from_mapping(cls, data: dict, where: str, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; fields left out keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}'; allowed here: "
            f"{', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(value, hints[name], prefix + name, where)
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'}: {exc}") from exc
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except (ValueError, OutpostError) as exc:
            raise ConfigError(f"{where}: {prefix}{exc}") from exc
    return obj


def to_mapping(obj) -> dict:
    """The dataclass as plain TOML-able data (tuples as lists, None left out)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        out[f.name] = _plain(value)
    return out


def _plain(value):
    if dataclasses.is_dataclass(value):
        return to_mapping(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
