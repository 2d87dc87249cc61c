"""Frozen configuration dataclasses and the one override path (dotted keys).

The CLI flags, grid files and sweep trials all change settings through
`override(cfg, {"ttt.inner_lr": 0.01, ...})`; an unknown key or a value of
the wrong type is a `ConfigError` naming the key. `settings_file`,
`set_items` and `split_list` turn what a user typed (a YAML file,
`--set KEY=VALUE`, a comma-separated flag) into such updates, for every
entry point alike. A setting's meaning is written once, as the comment on
its field's line; `field_help` reads it from there for every flag's help.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import textwrap
import tokenize
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A setting that does not exist or does not parse; the message names it."""


@functools.cache
def _field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on the line where the field's definition ends, in the class's source."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    body = ast.parse(src).body[0].body
    return {n.target.id: comments[n.end_lineno] for n in body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.end_lineno in comments}


def field_help(cfg: Any, key: str) -> str:
    """The comment on the line of dotted `key`'s field in `cfg`'s dataclass (or a nested one): the setting's one
    description, which flag help texts are made of. A field without one is a `ConfigError` naming it."""
    *parents, name = key.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    text = _field_comments(type(cfg)).get(name)
    if not text:
        raise ConfigError(f"{key}: {type(cfg).__name__}.{name} has no comment to be its help")
    return text


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    if isinstance(annotation, str):
        annotation = {"int": int, "float": float, "str": str, "bool": bool}.get(annotation, annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, value, args[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if annotation is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, dict):  # a mapping for a text setting (`--set faults={...}` read as YAML): its JSON
            return json.dumps(value, sort_keys=True)
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    return value


def override(cfg: Any, updates: Mapping[str, Any], _prefix: str = "") -> Any:
    """Return a copy of dataclass `cfg` with dotted-key `updates` applied."""
    nested: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    for key, value in updates.items():
        head, _, rest = key.partition(".")
        if head not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown setting {_prefix + key!r} (known under {_prefix or 'top level'}: {known})")
        if rest:
            if not dataclasses.is_dataclass(getattr(cfg, head)):
                raise ConfigError(f"{_prefix + head!r} has no sub-settings (got {_prefix + key!r})")
            nested.setdefault(head, {})[rest] = value
        else:
            if dataclasses.is_dataclass(getattr(cfg, head)):
                raise ConfigError(f"{_prefix + head!r} is a group of settings; set {_prefix + head}.<field>")
            direct[head] = _coerce(_prefix + key, value, hints[head])
    for head, sub in nested.items():
        direct[head] = override(getattr(cfg, head), sub, _prefix + head + ".")
    out = dataclasses.replace(cfg, **direct)
    validate = getattr(out, "validate", None)
    if validate is not None:
        validate()
    return out


GPU_DEFAULTS = {"ttt.dtype": "bf16"}  # on CUDA: bf16 autocast for static curves, calibration and TTT, as records run


def with_device_defaults(updates: Mapping[str, Any], cuda: bool) -> dict[str, Any]:
    """`updates` over the CUDA defaults when the run is on GPUs (what the user set wins), else `updates` as they are."""
    return {**GPU_DEFAULTS, **updates} if cuda else dict(updates)


def config_hash(obj: Any, length: int = 12) -> str:
    """Stable short hash of a dataclass or JSON-able object."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def settings_file(path: str | Path) -> dict[str, Any]:
    """A YAML (or JSON) file of settings, nested or dotted, as dotted-key updates (lists become tuples)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--grid {path}: file does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ConfigError(f"--grid {path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--grid {path}: expected a mapping of settings, got {type(loaded).__name__}")
    return _flatten(loaded)


def _flatten(obj: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = tuple(v) if isinstance(v, list) else v
    return out


def set_items(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items as updates; values are read as YAML (numbers, booleans, lists)."""
    updates = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: cannot read the value ({str(exc).splitlines()[0]})") from None
        updates[key.strip()] = tuple(loaded) if isinstance(loaded, list) else loaded
    return updates


def split_list(value: str, kind: Callable, flag: str) -> tuple:
    """A comma-separated flag as a tuple of `kind`."""
    items = [s.strip() for s in str(value).split(",") if s.strip()]
    try:
        return tuple(kind(s) for s in items)
    except ValueError:
        raise ConfigError(f"--{flag}: cannot read {value!r} as a list of {kind.__name__}") from None
