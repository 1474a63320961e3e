"""Request bodies checked against JSON schemas before a handler sees them."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import webob

from raksha.domain.errors import InvalidInput


def json_body(req: webob.Request, schema: dict[str, Any] | None, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object, validated; ``optional`` lets an empty body mean ``{}``."""
    raw = req.body
    if not raw.strip():
        if optional:
            body: Any = {}
        else:
            raise InvalidInput("the request needs a JSON body", code="BODY_REQUIRED")
    else:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"the body is not valid JSON: {exc}", code="BODY_NOT_JSON") from None
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema)
        problems = sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path))
        if problems:
            first = problems[0]
            where = "/".join(str(p) for p in first.absolute_path) or "(body)"
            raise InvalidInput(f"invalid body at {where}: {_message(first)}", code="BODY_INVALID",
                               errors=[f"{'/'.join(str(p) for p in e.absolute_path) or '(body)'}: {_message(e)}"
                                       for e in problems[:10]])
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object", code="BODY_INVALID")
    return body


def _message(err: jsonschema.ValidationError) -> str:
    """The schema's own words for a rule that spans fields (``anyOf``/``not`` with a ``description``)."""
    if err.validator in ("anyOf", "oneOf", "not") and isinstance(err.schema, dict) and err.schema.get("description"):
        return str(err.schema["description"])
    return str(err.message)


def query_int(req: webob.Request, name: str, default: int | None, *, minimum: int = 0,
              maximum: int | None = None) -> int | None:
    raw = req.GET.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name} must be an integer, not {raw!r}", code="QUERY_INVALID") from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
        raise InvalidInput(f"query parameter {name} must be {bound}", code="QUERY_INVALID")
    return value
