"""keybroker.broker: the trusted party's domain logic over the store.

:class:`Broker` is the one entry point (``Broker.from_home(open_home(path))``).
Principals enrol with a one-time token, a CSR and a signed HPKE key
(:mod:`.enrolment`); operators manage keysets (:mod:`.keysets`) and grants
(:mod:`.grants`); the broker seals key versions to holding principals and
records their proof-of-possession acks (:mod:`.deliveries`). Every state change
is appended to the transparency log in the same transaction (:mod:`.events`
lists the entries); :mod:`.audit` checks the log. :mod:`.messages` holds what
the client SDK must produce byte for byte. Time and randomness are injected;
there is no HTTP here.
"""

from keybroker.broker._context import Policy
from keybroker.broker.deliveries import DeliveryInfo
from keybroker.broker.enrolment import EnrolmentResult, EnrolmentToken
from keybroker.broker.grants import GrantInfo, GrantMode
from keybroker.broker.keysets import KeysetSummary, VersionSummary
from keybroker.broker.messages import (
    DeliveryEnvelope,
    HpkeKeyBinding,
    make_ack_proof,
    sign_with_identity,
    verify_ack_proof,
)
from keybroker.broker.principals import PrincipalInfo
from keybroker.broker.service import Broker

__all__ = [
    "Broker",
    "DeliveryEnvelope",
    "DeliveryInfo",
    "EnrolmentResult",
    "EnrolmentToken",
    "GrantInfo",
    "GrantMode",
    "HpkeKeyBinding",
    "KeysetSummary",
    "Policy",
    "PrincipalInfo",
    "VersionSummary",
    "make_ack_proof",
    "sign_with_identity",
    "verify_ack_proof",
]
