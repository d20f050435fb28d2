"""TOML configuration into frozen dataclasses, with environment and command-line overrides.

Layers, lowest to highest: dataclass defaults < TOML file < environment (``MQFED_<SECTION>_<KEY>``) <
overrides (dotted keys, from ``--set``). Invariants: an unknown key, a wrong type or an impossible value
is refused at load with a `ConfigError` naming the dotted key and where its value came from; a config
class states each default once and its rules on the field (`rule`), checked by `validate` in
``__post_init__``; `dump_toml` writes TOML that loads back equal. docs/configuration.md.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import sys
import types
from collections.abc import Mapping
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from common.errors import InvalidValue, MqfedError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pyproject installs tomli on 3.10
    import tomli as tomllib
if TYPE_CHECKING:  # annotations only (postponed): typing.TypeIs is 3.13+, DataclassInstance exists only in the stubs
    from _typeshed import DataclassInstance
    from typing_extensions import TypeIs

__all__ = ["ConfigError", "config_to_dict", "dump_toml", "load_config", "parse_overrides", "parse_value", "rule",
           "validate"]

T = TypeVar("T")
Flat = dict[str, tuple[Any, str]]  # dotted key -> (value, source), the merged layers


class ConfigError(MqfedError, ValueError):
    """A configuration was refused; the message names the dotted key and where its value came from."""


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, *,
                env: Mapping[str, str] | None = None, overrides: Mapping[str, object] | None = None,
                env_prefix: str = "MQFED_", strict_env: bool = False) -> T:
    """Build ``cls`` from its defaults, the TOML file at ``path``, ``env`` (``os.environ`` when None;
    pass ``{}`` to ignore the environment) and ``overrides`` (dotted key -> value; a None value sets
    None, so leave out the flags that were not given). Raises ConfigError; see the module docstring."""
    if not _is_section(cls):
        raise TypeError(f"load_config needs a dataclass, got {cls!r}")
    flat: Flat = {}
    if path is not None:
        _flatten(cls, _read_toml(path), os.fspath(path), "", flat)
    names = _env_names(cls, env_prefix)
    hints = get_type_hints(cls)
    sections = tuple(f"{env_prefix}{f.name.upper()}_" for f in dataclasses.fields(cls) if _is_section(hints[f.name]))
    for name, raw in (os.environ if env is None else env).items():
        if name in names:
            key, tp = names[name]
            flat[key] = (_from_env(raw, tp, key, name), name)
        elif name.startswith(sections) or (strict_env and name.startswith(env_prefix)):
            raise ConfigError(f"{name}: environment variable matches no config key{_suggest(name, names)}")
    for key, value in (overrides or {}).items():
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        _flatten(cls, nested, "override", "", flat)
    return _build(cls, flat, "", None)


def parse_value(raw: str) -> Any:
    """``raw`` read as a TOML value (``4``, ``1e-3``, ``true``, ``["cpu"]``, ``"x"``), else as the string itself."""
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return raw
    return parsed["v"] if len(parsed) == 1 else raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["fedbuff.buffer_size=4", ...]`` (``--set`` flags) as dotted key -> value; raises ConfigError."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. fedbuff.buffer_size=4")
        out[key.strip()] = parse_value(raw)
    return out


def rule(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None,
         choices: tuple[Any, ...] | None = None, what: str | None = None) -> Any:
    """A dataclass field whose value `validate` also checks against bounds or a set of choices (`what`: how
    an error message describes a valid value, when the bounds alone would read badly)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt), ("choices", choices), ("what", what))
              if v is not None}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rule": bounds})


_OPS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b), "le": ("<=", lambda v, b: v <= b),
        "lt": ("<", lambda v, b: v < b)}


def validate(obj: object, name: str | None = None) -> None:
    """Check every value field of the dataclass ``obj`` against its annotation and its `rule` (bounded numbers
    must also be finite). Raises InvalidValue ``"<name>.<field> must be <what>, got <value>"`` (name: the
    config section, default the class name); call it first in ``__post_init__``, then check by hand what
    spans several fields."""
    for f, tp in _fields(type(obj)):
        if _is_section(tp):
            continue
        value, bounds = getattr(obj, f.name), f.metadata.get("rule", {})
        ok = _accepts(tp, value)
        if ok and value is not None and bounds:
            if "choices" in bounds:
                ok = value in bounds["choices"]
            else:
                ok = math.isfinite(value) and all(test(value, bounds[k]) for k, (_, test) in _OPS.items() if k in bounds)
        if not ok:
            raise InvalidValue(f"{name or type(obj).__name__}.{f.name} must be {_describe(tp, bounds)}, got {value!r}")


def _describe(tp: Any, bounds: Mapping[str, Any]) -> str:
    if "what" in bounds:
        return bounds["what"]
    if "choices" in bounds:
        return "one of " + ", ".join(map(str, bounds["choices"]))
    args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, types.UnionType) else [tp]
    optional = " or None" if len(args) < len(get_args(tp)) else ""
    low = next(((k, bounds[k]) for k in ("ge", "gt") if k in bounds), None)
    high = next(((k, bounds[k]) for k in ("le", "lt") if k in bounds), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}{optional}"
    base = {int: "an int", float: "a finite number" if bounds else "a number", bool: "a bool", str: "a string"}
    text = " or ".join(base.get(a, _type_name(a)) for a in args)
    for k, v in filter(None, (low, high)):
        text += f" {_OPS[k][0]} {v}"
    return text + optional


def config_to_dict(obj: object) -> dict[str, Any]:
    """The config as nested dicts of plain values (tuples as lists, paths as str, None kept)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {obj!r}")
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}


def dump_toml(obj: object) -> str:
    """TOML text for the config ``obj``: top-level values, then one ``[table]`` per section."""
    lines: list[str] = []

    def table(o: Any, path: list[str]) -> None:
        if path:
            lines.append(f"\n[{'.'.join(map(_toml_key, path))}]")
        hints, sections = get_type_hints(type(o)), []
        for f in (f for f in dataclasses.fields(o) if f.init):
            value, tp = getattr(o, f.name), hints[f.name]
            if _is_section(tp):
                sections.append((f.name, value))
            elif value is not None:
                lines.append(f"{_toml_key(f.name)} = {_toml_value(_plain(value))}")
            elif _default(f) is not None:  # omitted, it would load as its default
                if any(_accepts(a, "none") for a in get_args(tp) if a is not type(None)):
                    raise ConfigError(f"{'.'.join(path + [f.name])}: None cannot be written as TOML here "
                                      f"(a string field whose default is not None)")
                lines.append(f'{_toml_key(f.name)} = "none"')
        for name, value in sections:
            table(value, path + [name])

    table(obj, [])
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_section(tp: object) -> TypeIs[type[DataclassInstance]]:
    return isinstance(tp, type) and get_origin(tp) is None and dataclasses.is_dataclass(tp)


def _fields(cls: type) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _env_names(cls: type, prefix: str, path: str = "") -> dict[str, tuple[str, Any]]:
    """Environment variable name -> (dotted key, type) for every value field of ``cls``."""
    names: dict[str, tuple[str, Any]] = {}
    for f, tp in _fields(cls):
        key = path + f.name
        found = _env_names(tp, prefix, key + ".") if _is_section(tp) else \
            {prefix + key.replace(".", "_").upper(): (key, tp)}
        for name, (other, _) in found.items():
            if name in names:
                raise ConfigError(f"{name}: ambiguous environment name for {names[name][0]} and {other}")
        names.update(found)
    return names


def _read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{os.fspath(path)}: cannot read config file: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # the message gives the line and column
        raise ConfigError(f"{os.fspath(path)}: invalid TOML: {e}") from None


def _flatten(cls: type, data: Mapping[str, Any], src: str, prefix: str, flat: Flat) -> None:
    """Record ``data``'s values into ``flat``, refusing unknown keys and values given for sections."""
    known = {f.name: tp for f, tp in _fields(cls)}
    for name, value in data.items():
        key, tp = prefix + name, known.get(name, dataclasses.MISSING)
        if tp is dataclasses.MISSING:
            raise ConfigError(f"{key}: unknown key{_suggest(name, known)} (from {src})")
        if not _is_section(tp):
            flat[key] = (value, src)
        elif isinstance(value, Mapping):
            _flatten(tp, value, src, key + ".", flat)
        else:
            raise ConfigError(f"{key}: is a section, expected a table, got {_show(value)} (from {src})")


def _from_env(raw: str, tp: Any, key: str, name: str) -> Any:
    if type(None) in get_args(tp) and raw.strip().lower() in ("", "none"):
        return None
    value = parse_value(raw)
    return value if _accepts(tp, value) else raw


def _build(cls: type[T], flat: Flat, prefix: str, base: Any) -> T:
    """``cls`` from the ``flat`` values under ``prefix``, on top of ``base`` (an instance) or defaults."""
    kwargs: dict[str, Any] = {}
    for f, tp in _fields(cls):
        key = prefix + f.name
        if _is_section(tp):
            sub = _default(f) if base is None else getattr(base, f.name)
            if sub is dataclasses.MISSING or any(k.startswith(key + ".") for k in flat):
                kwargs[f.name] = _build(tp, flat, key + ".", None if sub is dataclasses.MISSING else sub)
        elif key in flat:
            kwargs[f.name] = _convert(flat[key][0], tp, key, flat[key][1])
        elif base is None and _default(f) is dataclasses.MISSING:
            raise ConfigError(f"{key}: required, set it in the file, the environment or an override")
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        sources = sorted({src for k, (_, src) in flat.items() if k.startswith(prefix)})
        raise ConfigError(f"{prefix[:-1] or 'top level'}: {e} (from {', '.join(sources) or 'defaults'})") \
            from e


def _accepts(tp: Any, value: Any) -> bool:
    try:
        _convert(value, tp, "", "")
        return True
    except ConfigError:
        return False


def _convert(value: Any, tp: Any, key: str, src: str) -> Any:
    """``value`` checked against ``tp`` (arrays become list or tuple, ints become float for floats)."""
    origin, args = get_origin(tp), get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)} (from {src})")
    if tp is Any or tp is object:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None) and _accepts(arg, value):
                return _convert(value, arg, key, src)
        if type(None) in args and isinstance(value, str) and value.lower() == "none":
            return None
        raise bad
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise bad
    if tp in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise bad
            return tuple(_convert(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
        items = [_convert(v, args[0] if args else Any, f"{key}[{i}]", src) for i, v in enumerate(value)]
        return items if (origin or tp) is list else tuple(items)
    if tp is dict or origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise bad
        return {k: _convert(v, args[1] if args else Any, f"{key}.{k}", src) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and issubclass(tp, PurePath) and isinstance(value, (str, PurePath)):
        return tp(value)
    if origin is None and isinstance(tp, type) and isinstance(value, tp) \
            and (tp is bool or not isinstance(value, bool)):
        return value
    raise bad


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and get_origin(tp) is None else str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _suggest(name: str, candidates: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value) if isinstance(value, PurePath) else value


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan" if math.isnan(value) else \
            ("inf" if value > 0 else "-inf")
    if isinstance(value, str):  # JSON escapes are valid TOML escapes; TOML also forbids a raw DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {_show(value)} as TOML")
