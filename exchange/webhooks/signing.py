"""The two signatures on every delivery, both keyed by the webhook's secret as shown at create.

- `Gpux-Signature: t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`, Stripe's scheme: the key is
  the whole secret string, so Stripe's verifier accepts it as a Stripe signature header.
- Standard Webhooks: `webhook-id` (stable across retries of one message: the receiver's dedupe key),
  `webhook-timestamp` (unix s) and `webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<t>.<body>")>`,
  where the key is the secret's part after `whsec_` read as base64, as that spec and its libraries do.
A receiver refuses a timestamp too far from its clock (replays)."""
from __future__ import annotations

import base64
import hashlib
import hmac

SIGNATURE_HEADER = "Gpux-Signature"
SECRET_PREFIX = "whsec_"


def stripe_style(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def standard_key(secret: str) -> bytes:
    encoded = secret[len(SECRET_PREFIX):] if secret.startswith(SECRET_PREFIX) else secret
    return base64.b64decode(encoded + "==")


def standard_webhooks(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(standard_key(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def message_id(delivery_id: int) -> str:
    return f"msg_{delivery_id}"


def signed_headers(secret: str, delivery_id: int, timestamp: int, body: bytes) -> dict[str, str]:
    msg_id = message_id(delivery_id)
    return {SIGNATURE_HEADER: stripe_style(secret, timestamp, body),
            "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": standard_webhooks(secret, msg_id, timestamp, body)}
