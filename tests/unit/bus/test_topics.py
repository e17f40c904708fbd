"""Bus topic names: derivation reveals no name and is stable; the grammar admits no wildcard."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keybroker.bus import check_durable, check_topic, principal_topic
from keybroker.bus.topics import from_mqtt, to_mqtt
from keybroker.errors import ConfigurationError, LocalProtocolError

SALT = bytes(range(32))


def test_known_answer() -> None:
    """Pinned: changing the derivation would move every principal to a new topic."""
    assert principal_topic("device/alice-phone", SALT) == "kb.7f48d414e91e52c3cea68311712f31b7"
    assert principal_topic("site/fra1", b"\x00" * 16) == "kb.fd714bab35eccabc42e5b98ee09ccf3f"


def test_construction_is_labelled_hmac_sha256() -> None:
    mac = hmac.new(
        SALT, b"keybroker/bus/principal-topic/v1\x00device/alice-phone", hashlib.sha256
    ).hexdigest()
    assert principal_topic("device/alice-phone", SALT) == "kb." + mac[:32]


def test_stable_and_distinct() -> None:
    assert principal_topic("user/bob", SALT) == principal_topic("user/bob", SALT)
    assert principal_topic("user/bob", SALT) != principal_topic("user/bob2", SALT)
    assert principal_topic("user/bob", SALT) != principal_topic("user/bob", SALT[::-1])
    assert principal_topic("user/bob", SALT, prefix="kbt1").startswith("kbt1.")


@given(st.text(min_size=1, max_size=80))
def test_any_principal_gets_a_well_formed_opaque_topic(principal_id: str) -> None:
    topic = principal_topic(principal_id, SALT)
    prefix, digest = topic.split(".")
    assert prefix == "kb"
    assert len(digest) == 32
    assert set(digest) <= set("0123456789abcdef")
    assert check_topic(topic) == topic


@pytest.mark.parametrize(
    "principal_id",
    ["user/alice", "device/alice-phone", "site/fra1", "node/edge-cdg-07", "service/payments"],
)
def test_reveals_no_name(principal_id: str) -> None:
    topic = principal_topic(principal_id, SALT)
    kind, name = principal_id.split("/")
    for part in (kind, name, *name.split("-")):
        if len(part) >= 3:
            assert part.lower() not in topic.lower()
            assert part.encode().hex() not in topic


def test_salt_must_be_long_enough() -> None:
    with pytest.raises(ConfigurationError, match="at least 16"):
        principal_topic("user/bob", b"short")


def test_empty_principal_or_bad_prefix() -> None:
    with pytest.raises(LocalProtocolError):
        principal_topic("", SALT)
    with pytest.raises(LocalProtocolError):
        principal_topic("user/bob", SALT, prefix="kb.x")


@pytest.mark.parametrize(
    "topic", ["kb.0a1b", "kb", "kb.a.b.c", "KB_x-1.y", "a." * 7 + "a", "x" * 64 + ".y"]
)
def test_valid_topics(topic: str) -> None:
    assert check_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "kb.",
        ".kb",
        "kb..x",
        "kb.*",
        "kb.>",
        "kb.+",
        "kb.#",
        "kb/x",
        "kb x",
        "kb.x\n",
        "kb.é",
        "a." * 8 + "a",  # nine tokens
        "x" * 65,
        "kb.\x00",
    ],
)
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(LocalProtocolError):
        check_topic(topic)


@pytest.mark.parametrize("name", ["", "a.b", "a*", "a>", "a b", "x" * 65, "a/b"])
def test_invalid_durable_names(name: str) -> None:
    with pytest.raises(LocalProtocolError):
        check_durable(name)


def test_mqtt_mapping_round_trips() -> None:
    assert to_mqtt("kb.0a1b") == "kb/0a1b"
    assert from_mqtt(to_mqtt("kb.a.b")) == "kb.a.b"
