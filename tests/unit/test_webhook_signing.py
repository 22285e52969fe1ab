"""Both signatures of a delivery, checked by the verifiers receivers run: Stripe's and the Standard
Webhooks package, each keyed by the secret exactly as the create answer shows it."""
from __future__ import annotations

import secrets
import time

import pytest
import standardwebhooks
import stripe

from exchange.webhooks.signing import SIGNATURE_HEADER, signed_headers

BODY = b'{"channel":"stream","type":"fill","seq":1,"data":{"id":7}}'


@pytest.mark.parametrize("secret", ["whsec_" + secrets.token_hex(32), "whsec_" + secrets.token_hex(32)])
def test_standard_webhooks_and_stripe_verify_a_signed_body_and_refuse_a_tampered_one(secret: str) -> None:
    headers = signed_headers(secret, 41, int(time.time()), BODY)
    assert headers["webhook-id"] == "msg_41"
    assert standardwebhooks.Webhook(secret).verify(BODY, headers)["seq"] == 1
    stripe.WebhookSignature.verify_header(BODY.decode(), headers[SIGNATURE_HEADER], secret, tolerance=300)
    tampered = BODY.replace(b'"seq":1', b'"seq":2')
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(tampered, headers)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(tampered.decode(), headers[SIGNATURE_HEADER], secret, tolerance=300)
    # Another message id (a replay of the signature onto another message) does not verify either.
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(BODY, {**headers, "webhook-id": "msg_42"})
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook("whsec_" + secrets.token_hex(32)).verify(BODY, headers)


def test_an_old_timestamp_is_refused_by_both() -> None:
    secret = "whsec_" + secrets.token_hex(32)
    headers = signed_headers(secret, 1, int(time.time()) - 3600, BODY)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(BODY, headers)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(BODY.decode(), headers[SIGNATURE_HEADER], secret, tolerance=300)
