"""Request-body validation against the provider's published JSON schema.

The schema is a verbatim copy of the OpenAPI request body for
alibaba/wan2.1-t2v-turbo, shipped as package data so the project does not
depend on ../shared at run time.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

# The legacy endpoint predates the rename of this one flag.
UNIVERSAL_EXPANSION_FLAG = "enhance_prompt"
LEGACY_EXPANSION_FLAG = "enable_prompt_expansion"


def load_universal_schema() -> dict:
    text = resources.files("sandbox").joinpath("request_schema.json").read_text("utf-8")
    return json.loads(text)


def derive_legacy_schema(universal: dict) -> dict:
    """Same schema with the prompt-expansion flag renamed, property order kept."""
    legacy = copy.deepcopy(universal)
    legacy["properties"] = {
        (LEGACY_EXPANSION_FLAG if name == UNIVERSAL_EXPANSION_FLAG else name): spec
        for name, spec in universal["properties"].items()
    }
    legacy["required"] = [
        LEGACY_EXPANSION_FLAG if name == UNIVERSAL_EXPANSION_FLAG else name
        for name in universal.get("required", [])
    ]
    return legacy


_UNIVERSAL = load_universal_schema()
VALIDATORS = {
    "universal": Draft202012Validator(_UNIVERSAL),
    "legacy": Draft202012Validator(derive_legacy_schema(_UNIVERSAL)),
}


def _describe(error: ValidationError) -> str:
    field = ".".join(str(part) for part in error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [n for n in error.validator_value if n not in error.instance]
        prefix = f"{field}." if field else ""
        return f"{prefix}{missing[0]}: is required"
    return f"{field or 'body'}: {error.message}"


def body_error(body: object, endpoint: str) -> str | None:
    """Return "<field path>: <reason>" for an invalid body, None when valid."""
    error = best_match(VALIDATORS[endpoint].iter_errors(body))
    return None if error is None else _describe(error)


def defaulted(body: dict, field: str) -> Any:
    """A body field, or the schema default when the client left it out."""
    return body.get(field, _UNIVERSAL["properties"][field].get("default"))
