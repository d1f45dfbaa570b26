"""Loading: a YAML file, then dotted ``key=value`` overrides; every error names the offending key."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .common import DEFAULT_CONFIG, ConfigError
from .core import RouterServeConfig


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
            head, sep, rest = msg.partition(": ")
            if sep and re.fullmatch(r"[A-Za-z_][\w.\-]*", head):  # a nested key named by a validator
                key, msg = (f"{key}.{head}" if key != "<root>" else head), rest
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(cur, list):  # llm.candidates.0.price: a list item by index
            if not part.isdigit() or int(part) >= len(cur):
                raise ConfigError(f"{dotted}: {part} is not an index of {'.'.join(parts[:i])} (0..{len(cur) - 1})")
            if last:
                cur[int(part)] = value
            else:
                cur = cur[int(part)]
            continue
        if not isinstance(cur, dict):
            raise ConfigError(f"{dotted}: {parts[i - 1]} is not a section")
        if last:
            cur[part] = value
        else:
            cur = cur.setdefault(part, {})


def config_from_dict(data: dict[str, Any]) -> RouterServeConfig:
    try:
        return RouterServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from None


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> RouterServeConfig:
    """Read a YAML config (default: configs/local.yaml) and apply ``key.path=value`` overrides."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw))
    return config_from_dict(data)
