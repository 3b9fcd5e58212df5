"""Structured output on the HTTP API: OpenAI's ``response_format`` and vLLM's
``structured_outputs`` (and the ``guided_*`` fields vLLM had before 0.12) as the engine's
``StructuredOutput``, built through ``protos.requests.structured_output`` as on the gRPC front.

Only the form is checked here; the engine compiles the spec when the request is added, and a
bad schema, regex or grammar comes back as a 400 with llguidance's message before any token.
"""

from __future__ import annotations

import json
from typing import Any

from protos.errors import InvalidRequestError
from protos.requests import structured_output
from protos.sampling import StructuredOutput

# vLLM's structured_outputs keys -> StructuredOutput's kinds.
_VLLM_KINDS = {
    "json": "json_schema",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
}
# vLLM keys that only pick or tune its backends: nothing to do here.
_VLLM_IGNORED = frozenset({"disable_fallback", "_backend", "_backend_was_auto"})
_GUIDED = {
    "guided_json": "json_schema",
    "guided_regex": "regex",
    "guided_choice": "choice",
    "guided_grammar": "grammar",
}


def structured_output_of(extra: dict[str, Any], response_format: Any) -> StructuredOutput | None:
    """The spec a body asks for through ``response_format`` or vLLM's fields (``extra``: the
    body's fields that the pydantic model does not declare); None for free text."""
    specs = [
        (param, so)
        for param, so in (
            ("response_format", from_response_format(response_format)),
            ("structured_outputs", from_vllm(extra.get("structured_outputs"))),
            *((name, _guided(name, extra.get(name))) for name in _GUIDED),
        )
        if so is not None
    ]
    if len(specs) > 1:
        names = ", ".join(p for p, _ in specs)
        raise InvalidRequestError(f"set only one of {names}", specs[1][0])
    return specs[0][1] if specs else None


def from_response_format(v: Any) -> StructuredOutput | None:
    """OpenAI's ``{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}``."""
    if v is None:
        return None
    kind = v.get("type") if isinstance(v, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return structured_output("json_object", True, "response_format")
    if kind == "json_schema":
        return structured_output("json_schema", _schema(v.get("json_schema")), "response_format")
    raise InvalidRequestError(
        "response_format.type must be text, json_object or json_schema", "response_format"
    )


def _schema(js: Any) -> str:
    """The schema of OpenAI's ``json_schema: {name, schema, strict, description}``, as text.
    ``strict`` false is enforced all the same (the output always matches the schema)."""
    if not isinstance(js, dict) or not isinstance(js.get("schema"), (dict, bool)):
        raise InvalidRequestError(
            "response_format.json_schema.schema must be a JSON schema (an object)",
            "response_format",
        )
    return json.dumps(js["schema"])


def from_vllm(v: Any) -> StructuredOutput | None:
    """vLLM's ``structured_outputs``: exactly one of json, regex, choice, grammar,
    json_object."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise InvalidRequestError("structured_outputs must be an object", "structured_outputs")
    set_keys = {k: x for k, x in v.items() if x is not None and x is not False}
    bad = sorted(set(set_keys) - set(_VLLM_KINDS) - _VLLM_IGNORED)
    if bad:
        raise InvalidRequestError(
            f"structured_outputs.{bad[0][:32]} is not supported by this server",
            "structured_outputs",
        )
    kinds = [k for k in set_keys if k in _VLLM_KINDS]
    if len(kinds) != 1:
        raise InvalidRequestError(
            "structured_outputs needs exactly one of json, regex, choice, grammar, json_object",
            "structured_outputs",
        )
    key = kinds[0]
    value = _value(key, set_keys[key], "structured_outputs")
    return structured_output(_VLLM_KINDS[key], value, "structured_outputs")


def _guided(name: str, v: Any) -> StructuredOutput | None:
    if v is None:
        return None
    return structured_output(_GUIDED[name], _value(name, v, name), name)


def _value(key: str, v: Any, param: str) -> Any:
    """A JSON schema may come as an object or as JSON text; a choice must be a list."""
    if key in ("json", "guided_json") and isinstance(v, (dict, bool)):
        return json.dumps(v)
    if key in ("choice", "guided_choice") and not isinstance(v, list):
        raise InvalidRequestError(f"{key} must be a list of strings", param)
    return v
