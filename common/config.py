"""The one builder of every config family: :func:`from_dict` turns a plain mapping (YAML,
``key=value`` overrides, a saved config) into a frozen config dataclass, checking each value against
the field's annotation before the dataclass validates its ranges:

  int               an integer; a float (``train.steps=5.7``, even ``6.0``) or a boolean is refused
  float             a number (an int is widened); a boolean or text is refused
  bool              ``true`` or ``false`` only (``train.elastic_ep=maybe`` is refused)
  str               text (``out_dir=5`` is refused: quote it, ``out_dir='5'``)
  Literal["a", "b"] one of the listed values (``train.precision=fp16`` is refused, naming them)
  X | None          null, or what X accepts
  tuple[int, ...]   a list (or tuple) of integers
  a dataclass       a nested mapping, built the same way

Every refusal is a ConfigError naming the dotted field, the value, the type it has and the one it
needs. A config's ``__post_init__`` checks what annotations cannot say (ranges, relations between
fields) with :func:`require`, and calls :func:`check_literals` so that a config built in code (not
through from_dict) is held to its Literal fields too.
"""

from __future__ import annotations

import functools
import types
from dataclasses import fields, is_dataclass
from typing import Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from common.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def require(ok: bool, message: str) -> None:
    """Raise ConfigError(``message``) unless ``ok``: the one check of every config's ``__post_init__``."""
    if not ok:
        raise ConfigError(message)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field annotations of the dataclass ``cls`` (resolved once per class)."""
    return get_type_hints(cls)


_KIND = {bool: "a boolean", int: "an integer", float: "a decimal number", str: "text", list: "a list",
         tuple: "a list", dict: "a mapping", type(None): "null"}


def _kind(value: Any) -> str:
    """What ``value`` is, in the words of a YAML file."""
    return next((name for t, name in _KIND.items() if type(value) is t), type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scalar_problem(key: str, value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the scalar annotation ``hint`` (int, float, bool, str); None if it does."""
    if hint is int and not _is_int(value):
        fix = f": write {key}={int(value)}" if isinstance(value, float) and value.is_integer() else ""
        return f"{key}={value!r} must be an integer (a whole number), not {_kind(value)}{fix}"
    if hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{key}={value!r} must be a number, not {_kind(value)}"
    if hint is bool and not isinstance(value, bool):
        return f"{key}={value!r} must be true or false, not {_kind(value)}"
    if hint is str and not isinstance(value, str):
        quote = f": quote it ({key}='{value}')" if isinstance(value, (int, float)) else ""
        return f"{key}={value!r} must be text, not {_kind(value)}{quote}"
    return None


def _optional(hint: Any) -> Any:
    """X for an annotation ``X | None`` (one X), else None."""
    if get_origin(hint) in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0]
    return None


def _literal_problem(key: str, value: Any, hint: Any) -> str | None:
    """Why ``value`` is none of the values of ``hint`` = Literal[...] (or Literal[...] | None, which
    also takes null); None if it is one, or if ``hint`` is no Literal."""
    inner = _optional(hint)
    if inner is not None:
        if value is None:
            return None
        hint = inner
    if get_origin(hint) is not Literal:
        return None
    allowed = get_args(hint)
    if any(type(value) is type(a) and value == a for a in allowed):  # True is not 1, nor 1 "1"
        return None
    return f"{key}={value!r} is not one of the allowed values {list(allowed)}"


def check_literals(config: Any, prefix: str = "") -> None:
    """ConfigError unless every Literal-typed field of the dataclass ``config`` holds one of its
    values (named ``prefix`` + field, e.g. ``train.precision``). For ``__post_init__``: from_dict checks
    the same before building, naming the whole dotted path; this holds configs built in code to it."""
    for name, hint in _hints(type(config)).items():
        problem = _literal_problem(prefix + name, getattr(config, name), hint)
        if problem:
            raise ConfigError(problem)


def _check_type(key: str, value: Any, hint: Any) -> None:
    inner = _optional(hint)
    if inner is not None:
        if value is None:
            return
        hint = inner
    scalar = hint in (int, float, bool, str)
    problem = _scalar_problem(key, value, hint) if scalar else _literal_problem(key, value, hint)
    if problem is None and get_origin(hint) is tuple and get_args(hint)[:1] == (int,) \
            and isinstance(value, (list, tuple)):
        bad = [v for v in value if not _is_int(v)]
        if bad:
            problem = f"{key}={list(value)} must be a list of integers: {bad[0]!r} is {_kind(bad[0])}"
    if problem:
        raise ConfigError(problem)


def from_dict(cls: type, data: Mapping[str, Any] | None, path: str = "") -> Any:
    """Build a (nested) config dataclass from a plain mapping, typed by its annotations: nested
    dataclasses from nested mappings, tuples from lists, every value checked against its field's
    type (see the module docstring; an int where a float is declared is widened). Unknown keys,
    values of the wrong type and missing fields raise ConfigError naming the dotted path."""
    where = path or "the config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = _hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(known)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint, key = hints[name], f"{path}.{name}" if path else name
        if get_origin(hint) in (Union, types.UnionType) and isinstance(value, list):
            hint = next((a for a in get_args(hint) if get_origin(a) is tuple), hint)  # int | tuple[int, ...]
        if is_dataclass(hint) and not isinstance(value, hint):
            value = from_dict(hint, value, key)
        elif getattr(hint, "__origin__", None) is tuple and hint.__args__[0] is str and isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip())  # "rgb,nir" on the command line
        else:
            _check_type(key, value, hint)
            if get_origin(hint) is tuple and isinstance(value, list):
                value = tuple(value)
            elif hint is float and isinstance(value, int):
                value = float(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise ConfigError(f"{cls.__name__}{' at ' + path if path else ''}: {exc}") from exc
