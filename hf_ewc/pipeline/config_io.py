"""Reading `hf-ewc train` config values: YAML 1.2 files, ``--key value`` overrides, and the check of each value against
its field's type annotation (so a config gets the same answer as Python would, in one line).
"""

import difflib
import enum
import os
import re
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ..utils import HfEwcError


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp))
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_NOT_THIS_TYPE = object()


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` (as YAML parsed it) converted to annotation ``tp``, or `_NOT_THIS_TYPE`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arm in get_args(tp):
            out = _coerce(value, arm)
            if out is not _NOT_THIS_TYPE:
                return out
        return _NOT_THIS_TYPE
    if tp is type(None):
        return None if value is None else _NOT_THIS_TYPE
    if origin is Literal:
        return value if value in get_args(tp) else _NOT_THIS_TYPE
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]  # a list: a YAML list or mapping is unhashable, and simply not a member
        return value if value in values or isinstance(value, tp) else _NOT_THIS_TYPE
    if tp is bool:
        return value if isinstance(value, bool) else _NOT_THIS_TYPE
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT_THIS_TYPE
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                return _NOT_THIS_TYPE
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _NOT_THIS_TYPE
    if tp is str:
        return value if isinstance(value, str) else _NOT_THIS_TYPE
    if origin is list or tp is list:
        if isinstance(value, str):  # `report_to: none`, `--report_to tensorboard`
            value = [value]
        if not isinstance(value, list):
            return _NOT_THIS_TYPE
        (item,) = get_args(tp) or (Any,)
        out = [_coerce(v, item) for v in value]
        return _NOT_THIS_TYPE if any(v is _NOT_THIS_TYPE for v in out) else out
    if origin is dict or tp is dict:
        return value if isinstance(value, dict) else _NOT_THIS_TYPE
    return value


def check_value(where: str, key: str, value: Any, tp: Any) -> Any:
    out = _coerce(value, tp)
    if out is _NOT_THIS_TYPE:
        raise HfEwcError(f"{where}{key} must be {describe_type(tp)}, got {value!r}; fix the value in the config.")
    return out


def unknown_key(where: str, key: str, valid: list[str], *, more: str = "", candidates=None) -> HfEwcError:
    close = difflib.get_close_matches(key, list(candidates or valid), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return HfEwcError(f"Unknown key {where + key!r}; {hint}valid keys: {', '.join(valid)}{more}.")


class _YAMLLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans (`ewc_mode: off` stays the string "off"), and there are no
    base-60 numbers (`structure: 2:4` stays the string "2:4", not 124)."""


_YAML12_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_YAML12_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_YAML12_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_YAMLLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _regexp, _first in (
    ("tag:yaml.org,2002:bool", _YAML12_BOOL, "tTfF"),
    ("tag:yaml.org,2002:int", _YAML12_INT, "-+0123456789"),
    ("tag:yaml.org,2002:float", _YAML12_FLOAT, "-+0123456789."),
):
    _YAMLLoader.add_implicit_resolver(_tag, _regexp, list(_first))


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1}); keep one", mark
            )
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_YAMLLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)


def parse_overrides(tokens: list[str]) -> list[tuple[str, Any]]:
    """``["--ewc_lambda", "50", "--domains.1.max_samples=200"]`` → ``[("ewc_lambda", 50), ("domains.1.max_samples",
    200)]``. Values are parsed as YAML (``null``, ``true``, ``1e-3``, ``[a, b]``, ``{k: v}``)."""
    out = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise HfEwcError(
                f"Unexpected argument {token!r}: overrides look like `--key value` or `--key=value` "
                "(e.g. `--ewc_lambda 50 --domains.1.max_samples 200`)."
            )
        key, sep, text = token[2:].partition("=")
        if not sep:
            if i + 1 >= len(tokens) or tokens[i + 1].startswith("--"):
                raise HfEwcError(f"Override --{key} has no value; write `--{key} VALUE`.")
            text = tokens[i + 1]
            i += 1
        i += 1
        try:
            value = yaml_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text
        out.append((key, value))
    return out


def apply_override(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        path = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise HfEwcError(
                    f"Override --{key}: {path!r} is not an index of a list of {len(node)} item(s); "
                    f"use 0…{len(node) - 1}."
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise HfEwcError(f"Override --{key}: {'.'.join(parts[:depth])!r} is a value, not a mapping or a list.")


def read_yaml(path: str | os.PathLike) -> dict:
    """A config file as a mapping; malformed YAML becomes an `HfEwcError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise HfEwcError(f"Config file {str(path)!r} not found; give the path of a YAML file (see configs/).")
    try:
        raw = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise HfEwcError(f"Malformed YAML in {path}:{line} {problem}; fix the syntax there.") from None
    except UnicodeDecodeError as err:
        raise HfEwcError(f"Config file {path} is not UTF-8 text ({err.reason}); save it as UTF-8.") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise HfEwcError(f"Config file {path} must hold a mapping at the top level, got {type(raw).__name__}.")
    return raw
