"""Reading settings: params.yaml (YAML 1.2 numbers), ``--set`` overrides, recipe overlays, validated
into :class:`opd.config.Params`; and flattening them for trackers. The schema is :mod:`opd.config`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from opd.config import ConfigError, Params, redact


def _format_error(err: ValidationError, source: str, overridden: frozenset[str] = frozenset()) -> str:
    lines = [f"{source}: invalid settings"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if key in overridden or any(key.startswith(o + ".") for o in overridden):
            key = f"{key} (from --set)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see params.yaml for the known keys)"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {key}: {msg}")
    lines[0] += f": {lines[1].strip()}"  # the first reason on the first line; any others below it
    return redact("\n".join(lines[:1] + lines[2:]))


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {p} is not a section")
    node[parts[-1]] = value


def parse(raw: dict[str, Any] | None, source: str = "params", overridden: frozenset[str] = frozenset()) -> Params:
    """Validate a params mapping; raise ConfigError naming the key (and ``--set`` when it came from one)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source, overridden)) from None


class _Yaml12Floats(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where ``5e-4`` is a string (a float needs a dot: ``5.0e-4``); YAML 1.2,
    DVC's ``-S`` and most editors read it as a number. Settings are read the 1.2 way."""


_Yaml12Floats.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\d[\d_]*)?\.?\d+(?:[eE][-+]?\d+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """params.yaml text, or a ``--set`` value, as YAML 1.2 reads it (see :class:`_Yaml12Floats`)."""
    return yaml.load(text, Loader=_Yaml12Floats)  # noqa: S506  (a SafeLoader subclass)


def merge_overlay(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    """``base`` with an overlay's values: mappings merge key by key, anything else (lists, a null or empty
    mapping in ``base``) is replaced. Every overlay key must be a key of ``base``: a recipe can only change
    settings, never invent one (a typo fails here, naming it)."""
    out = dict(base)
    for key, value in over.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in base:
            raise ConfigError(f"{name}: not a setting of params.yaml (overlays may only change existing keys)")
        if isinstance(value, dict) and isinstance(base[key], dict) and base[key]:
            out[key] = merge_overlay(base[key], value, name)
        else:
            out[key] = value
    return out


def read(path: Path) -> dict[str, Any]:
    """A params file's mapping (YAML 1.2); a missing file or bad YAML is a ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        return yaml_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def load_overlay(overlay: str | Path, base: str | Path | None = None) -> dict[str, Any]:
    """A recipe's settings: params.yaml (``base``; default the project's) with the overlay file's values,
    validated; returns the merged mapping (what ``python -m flows merge-params`` writes)."""
    from opd.paths import Layout

    paths = [Path(base) if base else Layout.here().params, Path(overlay)]
    raw = [read(p) for p in paths]
    try:
        merged = merge_overlay(*raw)
    except ConfigError as err:
        raise ConfigError(f"{paths[1]}: {err}") from None
    parse(merged, str(paths[1]))
    return merged


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Params:
    """Load params.yaml (default: the project folder's), apply dotted-key overrides, validate."""
    from opd.paths import Layout

    path = Path(path) if path else Layout.here().params
    raw = read(path)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return parse(raw, str(path), frozenset(overrides or ()))


def to_flat_dict(params: Params) -> dict[str, Any]:
    """Flatten to dotted keys (for trackers that want flat params)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", params.model_dump())
    return out
