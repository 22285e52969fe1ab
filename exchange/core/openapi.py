"""What `/schema` says the API answers, made true where Litestar's generator cannot know it:

- every refusal is our error shape (exchange/core/errors.py `ErrorBody`), not Litestar's
  `{"status_code", "detail"}`, and every operation lists the refusals any request can meet (a key
  missing or of another role, an object not found or another account's, a conflict, a refused
  field, a limit), so a client generated from the schema, or a checker like schemathesis, expects
  what it gets;
- a union answer (a lease in the tenant's or in the owner's view) is `anyOf`: the tenant's view
  has every field of the owner's, so a tenant's lease is valid under both and `oneOf` would refuse it;
- bounds the server holds in settings or checks by hand are written into the request schemas:
  a bid's duration, gang size and positive limit, a page cursor's spelling, a path id's range, a
  candle interval's values, and that no object takes a field it does not declare (every wire
  struct forbids unknown fields).

Applied once to the schema Litestar builds (and caches) when the app is created."""
from __future__ import annotations

from typing import Any

import msgspec

from exchange.core.bounds import BIGINT_MAX, CURSOR_PATTERN
from exchange.core.errors import ErrorBody
from exchange.core.settings import Settings
from exchange.markets.schemas import INTERVAL_SECONDS

# Refusals any operation may answer, each with the error shape. 400 replaces Litestar's own.
REFUSALS = {
    "400": "The request does not parse or has the wrong shape (unknown field, wrong type, out of range)",
    "401": "No valid API key",
    "402": "The balance cannot cover the hold (insufficient_funds)",
    "403": "The key's role may not do this",
    "404": "No such object, or another account's",
    "409": "A conflict: an idempotency key reused with another body, an object no longer in that state",
    "413": "The body is too large",
    "422": "A well-formed request the exchange refuses; `field` names what to change",
    "429": "Over a rate limit; see Retry-After",
}
ERROR_REF = "#/components/schemas/ErrorBody"
BID_TERMS = ("BidCreate", "QuoteRequest")
# Amounts that must be above zero (checked by hand, since the money spelling allows 0).
POSITIVE_AMOUNTS = (("BidCreate", "limit_price"), ("QuoteRequest", "limit_price"), ("DepositCreate", "amount"))
# A limit price above zero: the money spelling (exchange/core/money.py MONEY_PATTERN) but not 0.
POSITIVE_MONEY_PATTERN = r"^(?!0(\.0+)?$)(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?(?!\n)$"


def document_api(schema: dict[str, Any], settings: Settings) -> None:
    """Rewrite Litestar's generated OpenAPI document (a dict, changed in place)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _add_error_body(components)
    for path_item in schema.get("paths", {}).values():
        for method, operation in path_item.items():
            if method in ("get", "put", "post", "delete", "patch") and isinstance(operation, dict):
                _document_refusals(operation)
                _bound_parameters(operation)
                _any_of_unions(operation)
    for name in BID_TERMS:
        properties = components.get(name, {}).get("properties", {})
        if "duration_s" in properties:
            properties["duration_s"].update(minimum=settings.min_duration_s, maximum=settings.max_duration_s)
        if "gpus" in properties:
            properties["gpus"]["maximum"] = settings.max_gang_gpus
    for name, field in POSITIVE_AMOUNTS:
        properties = components.get(name, {}).get("properties", {})
        if field in properties:
            properties[field]["pattern"] = POSITIVE_MONEY_PATTERN
    _plain_text(schema.get("paths", {}).get("/metrics", {}).get("get"))
    for name, component in components.items():
        if component.get("type") == "object" and "properties" in component and name != "ErrorBody":
            component["additionalProperties"] = False


def _add_error_body(components: dict[str, Any]) -> None:
    (_,), defs = msgspec.json.schema_components([ErrorBody], ref_template="#/components/schemas/{name}")
    for name, definition in defs.items():
        components[name] = definition
    # Some refusals carry machine-readable hints beside "error" (a meter conflict's expected_seq).
    components["ErrorBody"].pop("additionalProperties", None)


def _document_refusals(operation: dict[str, Any]) -> None:
    responses = operation.setdefault("responses", {})
    error = {"application/json": {"schema": {"$ref": ERROR_REF}}}
    for status, description in REFUSALS.items():
        responses[status] = {"description": description, "content": error}


def _bound_parameters(operation: dict[str, Any]) -> None:
    for parameter in operation.get("parameters", []):
        schema = parameter.setdefault("schema", {})
        # `str | None` is `oneOf [string, null]`: bound the string option.
        options = [schema, *schema.get("oneOf", [])]
        if parameter.get("in") == "path" and schema.get("type") == "integer":
            schema.update(minimum=1, maximum=BIGINT_MAX)  # PathId: ids are 1 to 2**63-1
        elif parameter.get("name") == "cursor" and parameter.get("in") == "query":
            for option in options:
                if option.get("type") == "string":
                    option["pattern"] = CURSOR_PATTERN
        elif parameter.get("name") == "interval" and parameter.get("in") == "query":
            for option in options:
                if option.get("type") == "string":
                    option["enum"] = list(INTERVAL_SECONDS)


def _plain_text(operation: dict[str, Any] | None) -> None:
    """/metrics answers Prometheus text, not JSON."""
    if operation is not None and "200" in operation.get("responses", {}):
        operation["responses"]["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}


def _any_of_unions(operation: dict[str, Any]) -> None:
    for response in operation.get("responses", {}).values():
        for media in response.get("content", {}).values():
            body = media.get("schema", {})
            if "oneOf" in body:
                body["anyOf"] = body.pop("oneOf")
