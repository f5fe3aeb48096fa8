"""Loading a config: YAML, ``--set`` overrides, one-line errors naming field, value and what is allowed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel, ValidationError

from atkd_core.config.pipeline import PipelineConfig
from atkd_core.errors import ConfigError


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. loss.lam=0.5")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            raise ConfigError(
                f"--set {item!r}: VALUE is not valid YAML ({problem}); quote it, e.g. {key}='\"...\"'"
            ) from None
        set_field(raw, key, value, f"--set {item!r}")
    return raw


def set_field(raw: dict[str, Any], dotted_key: str, value: Any, what: str) -> None:
    """Set ``a.b.c`` in a raw config dict, creating sections; ``what`` names the change in errors."""
    parts = [p for p in dotted_key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"{what}: empty key")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{what}: {'.'.join(parts[: depth + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config (or the defaults when ``path`` is None), apply overrides, validate.

    Raises ConfigError with one line per problem; never a traceback for user error.
    """
    raw = read_yaml_mapping(path) if path is not None else {}
    return validate_config(apply_overrides(raw, overrides or []), str(path) if path else "config")


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; ConfigError when it is missing, invalid or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    if not loaded:
        # All defaults would write to runs/demo under whatever directory the command ran in.
        raise ConfigError(
            f"{path}: the config is empty (all defaults would write to runs/demo under the current "
            "directory); give at least workdir (atkd config schema lists every field)"
        )
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def validate_config(raw: dict[str, Any], source: str) -> PipelineConfig:
    """A PipelineConfig from a raw mapping; ConfigError (one line per problem, named by ``source``)."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source)) from None


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem: ``<source>: <field.path> = <value>: <problem>; allowed: <range>``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        allowed = _allowed_for(err["loc"])
        if err["type"] == "extra_forbidden":
            line = f"{source}: {loc}: unknown field"
        elif err["type"] == "missing":
            line = f"{source}: {loc}: required field is missing"
        elif err["type"] == "value_error" and isinstance(value, dict):
            # A cross-field check: its message already names the field it is about.
            line = f"{source}: {(loc + ': ') if loc else ''}{message}"
        else:
            line = f"{source}: {loc} = {_short(value)}: {message}"
        if allowed and "allowed" not in line:
            line += f"; allowed: {allowed}"
        lines.append(line)
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _allowed_for(loc: tuple[Any, ...]) -> str | None:
    """Describe a field's allowed values from its annotation and constraints, walking ``loc``."""
    model: Any = PipelineConfig
    field = None
    for part in loc:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        field = model.model_fields[part]
        model = _inner_model(field.annotation)
    if field is None:
        return None
    bounds = []
    for meta in field.metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            bound = getattr(meta, attr, None)
            if isinstance(meta, annotated_types.BaseMetadata) and bound is not None:
                bounds.append(f"{symbol} {bound}")
    if bounds:
        return " and ".join(bounds)
    mixed_union = get_origin(field.annotation) is not Literal and any(
        get_origin(arg) is not Literal and arg is not type(None) for arg in get_args(field.annotation)
    )
    if mixed_union and field.description and "Range: " in field.description:
        # e.g. a number or "auto": the literal alone would read as the only choice.
        return field.description.rsplit("Range: ", 1)[1].rstrip(".")
    choices = _literal_choices(field.annotation)
    if choices:
        return ", ".join(repr(c) for c in choices)
    return None


def _inner_model(annotation: Any) -> Any:
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    for arg in (annotation, *get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _literal_choices(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    for arg in get_args(annotation):
        if get_origin(arg) is Literal:
            return get_args(arg)
    return ()


def config_to_yaml(config: PipelineConfig) -> str:
    """The resolved config as YAML (paths as strings), loadable again by :func:`load_config`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
