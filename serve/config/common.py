"""What every config module shares: the strict base model, the error type, where things live,
and the check of Serve deployment options with Serve's own schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"
DATA_DIR_ENV = "ROUTERSERVE_DATA_DIR"


class ConfigError(ValueError):
    """A configuration problem; the message starts with the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _validate_deployment_options(value: dict[str, Any], name: str) -> dict[str, Any]:
    """Ray Serve deployment options, checked with Serve's own DeploymentSchema (plus unknown names,
    which the schema itself lets through)."""
    from ray.serve.schema import DeploymentSchema

    if "name" in value:
        raise ValueError("deployment names are fixed by routerserve; remove 'name'")
    unknown = sorted(set(value) - set(DeploymentSchema.model_fields))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a Ray Serve deployment option")
    try:
        DeploymentSchema.model_validate({"name": name, **value})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}: {first['msg']}") from None
    return value


def _looks_like_ref(ref: str) -> bool:
    """package:… and hub ids are not paths; anything existing on disk or starting with . or / is."""
    if ref.startswith("package:"):
        return True
    if ref.startswith((".", "/", "~")) or Path(ref).exists():
        return False
    return True
