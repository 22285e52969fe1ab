"""/v1/webhooks wire shapes."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from exchange.core.bounds import whole
from exchange.core.structs import Struct

EventKind = Literal["fill", "lease_started", "notice", "lease_ended"]
EVENT_KINDS = ("fill", "lease_started", "notice", "lease_ended")
# Long enough for any real endpoint with a query string; bounded so a row stays small.
MAX_URL_CHARS = 2048
WebhookUrl = Annotated[str, msgspec.Meta(min_length=8, max_length=MAX_URL_CHARS, pattern=whole(r"https?://[^\s\x00-\x1f\x7f]+"),
                                         description="an http or https URL")]


class WebhookCreate(Struct, frozen=True, kw_only=True):
    url: WebhookUrl
    events: Annotated[list[EventKind], msgspec.Meta(min_length=1, max_length=4)]


WebhookStatus = Literal["active", "disabled"]


class Webhook(Struct, frozen=True, kw_only=True, omit_defaults=True):
    id: int
    url: str
    events: list[str]
    created_at: datetime
    # "disabled" after GPUX_WEBHOOK_DISABLE_AFTER_S without a successful delivery: nothing is sent
    # (its events are kept) until POST /v1/webhooks/{id}/enable.
    status: WebhookStatus
    # Since when every attempt failed (null while the last one succeeded), and when it was disabled.
    failing_since: datetime | None
    disabled_at: datetime | None
    # Only in the answer to the create: the key of both signatures (`Gpux-Signature` and Standard
    # Webhooks' `webhook-signature`, exchange/webhooks/signing.py); never shown again.
    secret: str | None = None


class WebhookList(Struct, frozen=True, kw_only=True):
    items: list[Webhook]


class Delivery(Struct, frozen=True, kw_only=True):
    id: int
    kind: str
    seq: int | None  # the account event's seq (as on /v1/stream); null for a ping
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    next_attempt_at: datetime | None


class DeliveryList(Struct, frozen=True, kw_only=True):
    items: list[Delivery]
