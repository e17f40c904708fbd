"""Bus topic names: what they may contain, and how a principal's topic is derived.

A topic is a dotted name such as ``kb.3f9c…``: one to eight tokens of
``[A-Za-z0-9_-]`` joined by dots. That grammar is the intersection of what NATS
subjects and MQTT topic names allow, minus every wildcard (``*`` and ``>`` in
NATS, ``+`` and ``#`` in MQTT) and minus ``/`` and whitespace, so a topic can
never widen into a subscription on someone else's messages. On MQTT the dots
become ``/`` level separators (``kb/3f9c…``) so broker ACLs can match levels.

Topics are visible to whoever runs the message server and to anyone allowed to
subscribe to ``#`` or ``>``. They therefore must not reveal who they belong to:
:func:`principal_topic` derives an opaque, stable name from the principal id
with HMAC-SHA256 under a broker secret, so a principal name such as
``device/alice-phone`` cannot be read from the topic, nor confirmed by
recomputing candidate topics without the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from keybroker.errors import ConfigurationError, LocalProtocolError

#: The first token of every topic keybroker derives; the NATS stream covers ``kb.>``.
DEFAULT_PREFIX = "kb"

#: Domain-separation label: the HMAC input is ``label || 0x00 || utf8(principal_id)``.
TOPIC_LABEL = b"keybroker/bus/principal-topic/v1"

#: 128 bits of HMAC output: no collisions among any realistic number of principals.
TOPIC_DIGEST_BYTES = 16

#: Shorter salts could be brute-forced; 16 random bytes is the floor, 32 the norm.
MIN_SALT_BYTES = 16

MAX_TOPIC_LENGTH = 255
_NAME = r"[A-Za-z0-9_-]{1,64}"
_TOPIC_RE = re.compile(rf"{_NAME}(?:\.{_NAME}){{0,7}}")
_DURABLE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def principal_topic(principal_id: str, secret_salt: bytes, *, prefix: str = DEFAULT_PREFIX) -> str:
    """The bus topic of ``principal_id``: ``<prefix>.`` + 32 hex digits of HMAC-SHA256.

    Stable for a given salt; reveals nothing about the principal id to anyone
    without ``secret_salt`` (keep it with the broker's secrets, at least 16
    random bytes). Changing the salt moves every principal to a new topic.
    """
    if len(secret_salt) < MIN_SALT_BYTES:
        raise ConfigurationError(
            f"the bus topic salt must be at least {MIN_SALT_BYTES} random bytes "
            f"(got {len(secret_salt)})"
        )
    if not principal_id:
        raise LocalProtocolError("principal_topic() needs a non-empty principal id")
    if not _DURABLE_RE.fullmatch(prefix):
        raise LocalProtocolError(f"invalid topic prefix {prefix!r}: use [A-Za-z0-9_-]{{1,64}}")
    mac = hmac.new(secret_salt, TOPIC_LABEL + b"\x00" + principal_id.encode(), hashlib.sha256)
    return f"{prefix}.{mac.digest()[:TOPIC_DIGEST_BYTES].hex()}"


def check_topic(topic: str) -> str:
    """Return ``topic`` if it is a valid concrete topic, else raise :class:`LocalProtocolError`."""
    if (
        not isinstance(topic, str)
        or len(topic) > MAX_TOPIC_LENGTH
        or not _TOPIC_RE.fullmatch(topic)
    ):
        raise LocalProtocolError(
            f"invalid bus topic {topic!r}: use 1-8 dot-separated tokens of [A-Za-z0-9_-], "
            "no wildcards"
        )
    return topic


def check_durable(name: str) -> str:
    """Return ``name`` if it can name a durable subscription everywhere (NATS consumer, MQTT id)."""
    if not isinstance(name, str) or not _DURABLE_RE.fullmatch(name):
        raise LocalProtocolError(f"invalid durable name {name!r}: use [A-Za-z0-9_-]{{1,64}}")
    return name


def to_mqtt(topic: str) -> str:
    """``kb.abc`` → ``kb/abc``: MQTT levels, so ACLs and wildcards see the hierarchy."""
    return topic.replace(".", "/")


def from_mqtt(topic: str) -> str:
    """``kb/abc`` → ``kb.abc``."""
    return topic.replace("/", ".")
