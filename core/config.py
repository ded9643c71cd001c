"""Configuration: dataclasses next to their code, one precedence, strict keys.

Precedence is defaults < `pipelines.yaml` < command-line flags. Each component owns a
small dataclass (checked in its `__post_init__`); this module only builds them from
layers of plain dicts, refuses unknown keys (naming the key and the allowed keys),
and hashes the resolved result so a run folder can refuse a different config.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from core.errors import UserError

T = TypeVar("T")

# The repository's own pipelines.yaml: the embedded defaults used when no --config is given
# and the working folder has none.
REPO_PIPELINES = Path(__file__).resolve().parent.parent / "pipelines.yaml"


# Scientific notation that YAML 1.1 leaves as a string (`1e-4`, `3E+2`).
_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(UserError):
    """A configuration problem a user can fix; the message names the key and the file."""


def given(flags: Mapping[str, Any]) -> dict[str, Any]:
    """Command-line flags without the ones left out: a typer option left at its default is None
    ("not given") and must not override pipelines.yaml. (A `null` in YAML or `--set k=null` is
    a value: it does override, e.g. to switch a filter rule off.)"""
    out: dict[str, Any] = {}
    for key, value in flags.items():
        if isinstance(value, Mapping):
            value = given(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def deep_merge(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Merge dict layers left to right; later wins, `null` included (flags go through `given`)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = deep_merge(out[key], value)
            else:
                out[key] = value
    return out


def build(cls: type[T], data: Mapping[str, Any] | None, where: str | None = None) -> T:
    """Instantiate dataclass `cls` from `data`, recursing into nested dataclass fields.

    Unknown keys raise ConfigError("<where>: unknown key 'x' (allowed: a, b, c)").
    Missing keys take the dataclass defaults; values are coerced to the field's scalar type.
    """
    where = where or cls.__name__
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def merge(cls: type[T], *layers: Mapping[str, Any] | None, where: str | None = None) -> T:
    """`build(cls, deep_merge(defaults-free layers...))`: the one precedence rule."""
    return build(cls, deep_merge(*layers), where)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if dataclasses.is_dataclass(hint) or origin in (list, tuple, dict):
            raise ConfigError(f"{where}: expected {_kind(hint)}, got null")
        if hint in (int, float, str, bool):  # not Optional: null (`--set key=`) is not a value
            raise ConfigError(f"{where}: expected {hint.__name__}, got null")
        return None
    if origin in (typing.Union, types.UnionType):
        # `X | None`: coerce to X (the only optional shape configs use).
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of {hint.__name__} keys, got {value!r}")
        return build(hint, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r} (YAML: [a, b]; --set: a list literal)")
        inner = args[0] if args else Any
        items = [_coerce(inner, v, where) for v in value] if inner is not Ellipsis else list(value)
        return origin(items)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, str):
        # YAML 1.1 reads `3e-4` (no dot) as a string: accept numeric text for numeric fields.
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}") from None
    if hint is float and isinstance(value, str) and _FLOAT_RE.match(value):
        return float(value)  # YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        if hint is str and isinstance(value, (int, float)):
            return str(value)
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _kind(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} keys"
    return "a list" if typing.get_origin(hint) in (list, tuple) else "a mapping"


def execution(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that changes how a step runs (threads, memory, workers, batch size, a
    cluster address), never what it writes: left out of the run folder's identity
    (`settings`), so a rerun may change it and still resume the folder.

        threads: int = execution(1)  # duckdb threads per task
    """
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"execution": True})


def is_execution(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("execution"))


def settings(cfg: Any) -> dict[str, Any]:
    """The fields of a config dataclass that decide a step's output: all but `execution` ones."""
    data = to_dict(cfg)
    if not dataclasses.is_dataclass(cfg):
        return data
    skip = {f.name for f in dataclasses.fields(cfg) if is_execution(f)}
    return {k: v for k, v in data.items() if k not in skip}


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass (or dict) as plain JSON/YAML-safe data."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    return json.loads(json.dumps(data, default=str))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a resolved config (dataclass or dict)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def pipelines_path(path: str | os.PathLike | None = None) -> Path:
    """The config file to use: the one given, else ./pipelines.yaml, else the repo's own."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    local = Path("pipelines.yaml")
    return local if local.is_file() else REPO_PIPELINES


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's booleans: only true/false. In YAML 1.1 (PyYAML's default) `on`, `off`,
    `yes`, `no` are booleans, so `on: hash` (curate join's key) would be read as `True: hash`."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def parse_yaml(text: str) -> Any:
    """Parse YAML text as this project reads every config (1.2 booleans, no Python tags)."""
    return yaml.load(text, Loader=_Loader)


def load_yaml(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a pipelines.yaml (see `pipelines_path`); a parse error names the file."""
    p = pipelines_path(path)
    try:
        doc = parse_yaml(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return doc


def section(doc: Mapping[str, Any], dotted: str) -> dict[str, Any]:
    """`section(doc, "curate.filter")` -> that mapping, or {} when absent."""
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            raise ConfigError(f"{dotted}: {part!r} is inside a non-mapping value")
        node = node.get(part)
        if node is None:
            return {}
    if not isinstance(node, Mapping):
        raise ConfigError(f"{dotted}: expected a mapping, got {node!r}")
    return dict(node)


def parse_sets(items: list[str] | None) -> dict[str, Any]:
    """`["optim.lr=3e-4", "steps=10"]` -> {"optim": {"lr": 0.0003}, "steps": 10} (YAML values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        value = parse_yaml(raw)
        if isinstance(value, str) and _FLOAT_RE.match(value):
            value = float(value)  # `lr=3e-4`: YAML 1.1 has no float without a dot
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
