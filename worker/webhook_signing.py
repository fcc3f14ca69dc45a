"""Webhook signatures as the Standard Webhooks specification defines them.

A receiver checks them with any of that specification's libraries, or with
the dozen lines in README.md ("Events and webhooks"):

    webhook-id:        the event id, the same on every retry (de-duplicate on it)
    webhook-timestamp: Unix seconds when this attempt was signed
    webhook-signature: "v1," + base64(HMAC-SHA256(key, f"{id}.{timestamp}.{body}"))

The secret is written "whsec_" + base64(key). It lives only in the workers'
environment (VIDQ_WEBHOOK_SECRET) and in this process's memory: nothing here
logs it, and errors about it never repeat it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from urllib.parse import urlsplit

from .errors import ConfigError
from .netguard import host_problem, redacted

PREFIX = "whsec_"
# The specification asks for keys of 24 to 64 bytes.
MIN_KEY_BYTES, MAX_KEY_BYTES = 24, 64


def secret_key(secret: str) -> bytes:
    """The key bytes of a "whsec_..." secret; ConfigError (without the secret) if malformed."""
    encoded = secret.strip().removeprefix(PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("VIDQ_WEBHOOK_SECRET is not 'whsec_' followed by base64 "
                          "(the value is not shown)") from None
    if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
        raise ConfigError(f"VIDQ_WEBHOOK_SECRET decodes to {len(key)} bytes; use "
                          f"{MIN_KEY_BYTES} to {MAX_KEY_BYTES} random bytes")
    return key


def sign(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header's value for one attempt."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(key: bytes, message_id: str, timestamp: str, body: bytes, header: str) -> bool:
    """True if any space-separated "v1,..." signature in `header` matches."""
    expected = sign(key, message_id, int(timestamp), body)
    return any(hmac.compare_digest(expected, given) for given in header.split())


def headers(key: bytes, message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(key, message_id, timestamp, body),
            "content-type": "application/json"}


def check_webhook_settings(settings) -> None:
    """ConfigError naming the variable for a malformed webhook setting."""
    if settings.webhook_secret:
        secret_key(settings.webhook_secret)
    if settings.webhook_url:
        check_webhook_url(settings.webhook_url, "VIDQ_WEBHOOK_URL")
    if settings.webhook_retry_for_s < 0:  # the others are Settings' range checks
        raise ConfigError(f"VIDQ_WEBHOOK_RETRY_FOR_S={settings.webhook_retry_for_s:g}: "
                          "must not be negative")


def check_webhook_url(url: str, name: str) -> str:
    """An http(s) URL with a host and no credentials in it; ConfigError otherwise.
    (Where it may point is checked at every delivery, by the SSRF guard.)"""
    url = url.strip()
    if problem := host_problem(url):
        raise ConfigError(f"{name}: {redacted(url)!r} is not a usable URL: {problem}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: {redacted(url)!r} is not an http(s) URL with a host")
    if "@" in parts.netloc:
        raise ConfigError(f"{name}: credentials in the URL are refused; deliveries are "
                          "signed with VIDQ_WEBHOOK_SECRET instead")
    return url
