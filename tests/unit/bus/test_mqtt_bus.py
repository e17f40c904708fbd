"""MqttBus pieces that need no server: how a lost connection is classified."""

from __future__ import annotations

import pytest

aiomqtt = pytest.importorskip("aiomqtt")

from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.reasoncodes import ReasonCode  # noqa: E402

from keybroker.bus.mqttbus import _reason  # noqa: E402


def dropped(code: int) -> Exception:
    """The exception chain aiomqtt raises from ``messages`` when the server disconnects us."""
    cause = aiomqtt.MqttCodeError(ReasonCode(PacketTypes.DISCONNECT, identifier=code))
    try:
        raise aiomqtt.MqttError("Disconnected during message iteration") from cause
    except aiomqtt.MqttError as exc:
        return exc


def test_session_taken_over_is_recognised() -> None:
    assert _reason(dropped(0x8E)) == 0x8E


def test_other_disconnects_are_not_a_takeover() -> None:
    assert _reason(dropped(0x80)) == 0x80
    assert _reason(aiomqtt.MqttError("socket closed")) is None
