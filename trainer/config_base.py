"""Typed nested dataclass configs: load from YAML/TOML, override with ``--section.field=value``.

Generic machinery only; the product's config classes live in ``trainer/config.py``.
Unknown keys, wrong types and bad override syntax raise ``ConfigError`` (exit code 2 at the CLI).
"""
from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Bad configuration: names the file / key that is wrong."""


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a type annotation (dataclass, list, dict, scalar)."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed here")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported config type {tp!r}")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, why in getattr(cls, "REMOVED", {}).items():
        if key in data:
            raise ConfigError(f"{where}.{key}: this field was removed ({why}); delete it from the config")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{where}: {e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate(where)
        except ConfigError:
            raise
        except ValueError as e:  # validators outside trainer/ (models.config) raise plain ValueError
            raise ConfigError(str(e)) from None
    return obj


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj)


def read_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def _parse_scalar(text: str) -> Any:
    """Override values are YAML scalars/flow collections: 1e-3, true, [64, 32], {a: 1}."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override --{dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--a.b.c=value`` / ``a.b.c=value`` overrides onto a raw mapping (before typing)."""
    for item in overrides:
        body = item[2:] if item.startswith("--") else item
        if "=" not in body or not body.split("=", 1)[0]:
            raise ConfigError(f"bad override {item!r}: expected --section.field=value")
        key, raw = body.split("=", 1)
        _set_path(data, key, _parse_scalar(raw))
    return data


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_with_includes(path: str | Path, _seen: tuple = ()) -> dict:
    """A file plus its ``include:`` chain (paths relative to the including file; top file wins)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle")
    data = read_file(path)
    base = data.pop("include", None)
    if base is None:
        return data
    return _deep_merge(read_with_includes(path.parent / base, _seen + (path,)), data)


def _override_key(item: str) -> str:
    body = item[2:] if item.startswith("--") else item
    return body.split("=", 1)[0]


def _blame(message: str, root: str, overrides: list[str]) -> str:
    """Report an error in a field that a command-line override set against that override, not against
    the YAML file that merely holds the rest of the config."""
    if not message.startswith(root + "."):
        return message
    key = message[len(root) + 1:].split(":", 1)[0]
    for item in reversed(overrides):      # the last override of a key is the one that counts
        ok = _override_key(item)
        if key == ok or key.startswith(ok + ".") or key.startswith(ok + "[") or ok.startswith(key + "."):
            return f"override {item}: {message[len(root) + 1:]}"
    return message


def load(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """File (with its ``include:`` chain) + overrides -> typed config."""
    overrides = list(overrides or [])
    data = read_with_includes(path) if path is not None else {}
    apply_overrides(data, overrides)
    root = str(path) if path else "config"
    try:
        return from_dict(cls, data, root)
    except ConfigError as e:
        raise ConfigError(_blame(str(e), root, overrides)) from None


def dump(obj: Any, path: str | Path) -> None:
    """Save the resolved config (YAML, or JSON when the suffix says so)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = to_dict(obj)
    path.write_text(json.dumps(d, indent=2) if path.suffix == ".json" else yaml.safe_dump(d, sort_keys=False))
