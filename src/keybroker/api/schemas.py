"""What travels over the wire: request and response bodies (pydantic), shared with the SDK.

Conventions:

* request bodies refuse unknown fields (``extra="forbid"``: 422), so a typo
  never silently drops a setting; responses ignore unknown fields when the SDK
  reads them, so a newer server does not break an older client;
* binary fields are unpadded base64url strings (RFC 4648 §5), canonical only;
* times are RFC 3339 strings in UTC; durations are whole seconds;
* principals are ``<kind>/<name>``; keyset names are ``/``-separated segments,
  each starting with a letter or digit (no empty, ``.`` or ``..`` segment, so
  a name survives being put into a URL path unchanged).

This module imports pydantic only: the SDK uses it without the server.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Annotated, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    WithJsonSchema,
)

from keybroker.keys import TEMPLATES

PRINCIPAL_PATTERN: Final = r"^(site|node|device|service|user)/[a-z0-9][a-z0-9._-]{0,62}$"
PRINCIPAL_NAME_PATTERN: Final = r"^[a-z0-9][a-z0-9._-]*$"
#: ``PrincipalId`` allows 64 characters in all (the certificate CN's upper bound).
PRINCIPAL_MAX: Final = 64
KEYSET_SEGMENT: Final = r"[A-Za-z0-9][A-Za-z0-9._:@+-]*"
KEYSET_PATTERN: Final = rf"^{KEYSET_SEGMENT}(/{KEYSET_SEGMENT})*$"
#: ``keysets.name`` is VARCHAR(128).
KEYSET_MAX: Final = 128
DELIVERY_ID_MAX: Final = 36
MAX_TTL_SECONDS: Final = 30 * 24 * 3600
#: RFC 5280 §5.3.1 reason codes by their ``x509.ReasonFlags`` names.
RevocationReason = Literal[
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "privilegeWithdrawn",
    "aACompromise",
]

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str) -> bytes:
    """Strict unpadded base64url; :class:`ValueError` for anything else."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not unpadded base64url") from None
    if b64encode(data) != text:
        # Non-zero padding bits: two strings for one value would defeat byte-exact checks.
        raise ValueError("not canonical base64url")
    return data


def _b64_validator(max_bytes: int) -> PlainValidator:
    def parse(value: object) -> bytes:
        if isinstance(value, bytes):  # built in Python, not parsed from JSON
            data = value
        elif isinstance(value, str):
            data = b64decode(value)
        else:
            raise ValueError("expected a base64url string")
        if len(data) > max_bytes:
            raise ValueError(f"longer than {max_bytes} bytes")
        return data

    return PlainValidator(parse)


def _b64_schema(max_bytes: int) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "type": "string",
            "contentEncoding": "base64url",
            "pattern": "^[A-Za-z0-9_-]*$",
            "maxLength": -(-max_bytes * 4 // 3),
        }
    )


_B64_OUT = PlainSerializer(b64encode, return_type=str)

Proof = Annotated[bytes, _b64_validator(256), _B64_OUT, _b64_schema(256)]
HpkePublicKey = Annotated[bytes, _b64_validator(1024), _B64_OUT, _b64_schema(1024)]
IdentitySignature = Annotated[bytes, _b64_validator(256), _B64_OUT, _b64_schema(256)]
Hash = Annotated[bytes, _b64_validator(64), _B64_OUT, _b64_schema(64)]
Blob = Annotated[bytes, _b64_validator(1 << 20), _B64_OUT, _b64_schema(1 << 20)]

PrincipalText = Annotated[
    str, Field(pattern=PRINCIPAL_PATTERN, max_length=PRINCIPAL_MAX, examples=["site/fra1"])
]


KeysetName = Annotated[
    str,
    Field(pattern=KEYSET_PATTERN, max_length=KEYSET_MAX, examples=["site/fra1/restore"]),
]


def _known_template(name: str) -> str:
    if name not in TEMPLATES:
        raise ValueError("unknown key template")
    return name


TemplateName = Annotated[
    str,
    AfterValidator(_known_template),
    WithJsonSchema({"type": "string", "enum": sorted(TEMPLATES)}),
]
TtlSeconds = Annotated[int, Field(ge=1, le=MAX_TTL_SECONDS, description="Lifetime in seconds")]
Version = Annotated[int, Field(ge=1, lt=1 << 31)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- enrolment ---------------------------------------------------------------------------


DnsName = Annotated[str, Field(min_length=1, max_length=253, examples=["ks1.example.net"])]


class EnrolmentTokenCreate(Request):
    principal: PrincipalText
    ttl_seconds: TtlSeconds = 24 * 3600
    #: Host names a ``service`` principal's certificate carries (it is a TLS server's too).
    dns_names: Annotated[list[DnsName], Field(max_length=4)] = []


class EnrolmentTokenIssued(Response):
    """A one-time token. ``token`` is shown this once: hand it to the principal out of band."""

    token_id: str
    principal: str
    expires_at: datetime
    token: str = Field(repr=False)
    dns_names: list[str] = []


class HpkeKeyIn(Request):
    """The principal's HPKE sealing key, signed by its identity key (see HpkeKeyBinding)."""

    template: Annotated[str, Field(max_length=32)] = "X25519_HPKE"
    key_id: Annotated[int, Field(ge=0, lt=1 << 32)]
    public_key: HpkePublicKey
    signature: IdentitySignature


class EnrolmentCreate(Request):
    principal: PrincipalText
    token: Annotated[str, Field(min_length=1, max_length=128, repr=False)]
    csr_pem: Annotated[str, Field(min_length=1, max_length=16 * 1024)]
    hpke: HpkeKeyIn


class EnrolmentOut(Response):
    principal: str
    certificate_pem: str
    ca_certificate_pem: str
    reenrolled: bool


# -- principals ---------------------------------------------------------------------------


class PrincipalOut(Response):
    principal: str
    status: str
    serial_number: str | None
    hpke_template: str | None
    hpke_key_id: int | None
    hpke_public_key: HpkePublicKey | None
    certificate_sha256: Hash | None
    certificate_not_after: datetime | None
    created_at: datetime
    updated_at: datetime


class PrincipalList(Response):
    principals: list[PrincipalOut]


class PrincipalRevoke(Request):
    reason: RevocationReason = "unspecified"


# -- keysets ------------------------------------------------------------------------------


class KeysetCreate(Request):
    name: KeysetName
    template: TemplateName


class KeysetRotate(Request):
    template: TemplateName | None = None


class KeyVersionOut(Response):
    version: int
    key_id: int
    template: str
    state: str
    public_key: Blob | None
    created_at: datetime | None
    state_changed_at: datetime | None


class KeysetOut(Response):
    name: str
    purpose: str
    template: str
    revision: int
    primary: int | None
    versions: list[KeyVersionOut]
    created_at: datetime
    updated_at: datetime


class KeysetList(Response):
    keysets: list[KeysetOut]


# -- grants -------------------------------------------------------------------------------


class GrantIn(Request):
    principal: PrincipalText
    keyset: KeysetName
    mode: Literal["use", "hold"]


class GrantOut(Response):
    grant_id: str
    principal: str
    keyset: str
    mode: str
    created_at: datetime
    revoked_at: datetime | None


class GrantList(Response):
    grants: list[GrantOut]


# -- deliveries ---------------------------------------------------------------------------


class DeliveryCreate(Request):
    keyset: KeysetName
    version: Version
    principal: PrincipalText
    ttl_seconds: TtlSeconds = 3600


class DeliveryOut(Response):
    """A delivery as operators see it: no sealed bytes, no challenge."""

    delivery_id: str
    principal: str
    keyset: str
    version: int
    state: str
    created_at: datetime
    expires_at: datetime
    completed_at: datetime | None
    failure_reason: str | None


class DeliveryList(Response):
    deliveries: list[DeliveryOut]


class EnvelopeOut(Response):
    """A sealed delivery for its recipient.

    ``envelope`` is the canonical, CA-signed :class:`DeliveryEnvelope`; the SDK
    decodes and verifies that and nothing else. The other fields repeat it for
    readers, plus ``purpose``, the keyset's purpose the SDK needs to hold the
    key (not signed; the sealed record inside names it again and installing
    checks they agree).
    """

    delivery_id: str
    recipient: str
    keyset: str
    purpose: str
    version: int
    expires_at_ms: int
    envelope: Blob


class Inbox(Response):
    deliveries: list[EnvelopeOut]


class AckIn(Request):
    proof: Proof


# -- holdings -----------------------------------------------------------------------------


class HeldVersionOut(Response):
    version: int
    key_id: int
    #: pending, primary, enabled, disabled or destroyed (``keybroker.keys.KeyState``).
    state: str


class HoldingOut(Response):
    """A keyset the caller holds: public facts only, never key material."""

    name: str
    purpose: str
    primary: int | None
    versions: list[HeldVersionOut]


class Holdings(Response):
    holdings: list[HoldingOut]


# -- log ----------------------------------------------------------------------------------


class TreeHeadOut(Response):
    tree_size: int
    root_hash: Hash
    timestamp_ms: int
    key_id: str
    signature: Hash


class LogEntries(Response):
    start: int
    entries: list[Blob]


class InclusionProofOut(Response):
    leaf_index: int
    tree_size: int
    hashes: list[Hash]


class ConsistencyProofOut(Response):
    old_size: int
    new_size: int
    hashes: list[Hash]


class LogPublicKey(Response):
    algorithm: Literal["ed25519"]
    key_id: str
    public_key: Hash
    public_key_pem: str


# -- system -------------------------------------------------------------------------------


class Health(Response):
    status: Literal["ok"]
    database: Literal["ok"]
    log_size: int
