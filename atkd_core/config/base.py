"""The base of every config section: unknown keys refused, cross-field rules in the JSON schema."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def when(field: str, values: tuple[str, ...], then: dict[str, Any]) -> dict[str, Any]:
    """A JSON-schema rule: where ``field`` holds one of ``values``, the section must match ``then``."""
    return {"if": {"properties": {field: {"enum": list(values)}}, "required": [field]}, "then": then}


def cross_field_rules(*rules: dict[str, Any]) -> ConfigDict:
    """StrictModel's config with cross-field rules in the section's JSON schema.

    Prefect checks a deployment's parameters against that schema when a run is submitted (and its
    form shows the failures), but cannot run the model validators; these rules repeat the
    validators' checks that JSON Schema can state, so such mistakes are refused at submit rather than
    when the run starts. The validators stay the authority; tests hold the two in agreement.
    """
    return ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra={"allOf": list(rules)})


NON_EMPTY_STRING: dict[str, Any] = {"type": "string", "minLength": 1}
