"""The out-of-band pairing code: what a device's QR code or label says about it.

Modelled on Wi-Fi Easy Connect's bootstrapping URI (``DPP:M:<mac>;K:<key>;;``):
``keybroker-pair:`` followed by ``TAG:value;`` fields and a final ``;``::

    keybroker-pair:V:1;S:SN-0042;M:0024befffe804ff1;P:lamp-2;K:<base64url SHA-256 of SPKI>;;

* ``V`` format version (1), ``S`` serial number, ``M`` hardware id (48-bit MAC, 12
  lower-case hex digits), ``P`` model, ``K`` SHA-256 of the device key's DER
  SubjectPublicKeyInfo, base64url without padding (43 characters);
* every field exactly once, in this order, nothing else: there is one string per
  code, so a code can be compared, logged and signed as text.

Unlike DPP, the code carries a hash of the key, not the key: the certificate
brings the key, and the code pins it (the controller refuses a certificate whose
key hash differs, however valid its chain). The identification info is what the
certificate must name (:func:`keybroker.pki.verify_device_identity`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Final

from cryptography import x509

from keybroker.errors import DecodeError
from keybroker.pki import DeviceIdentity, device_identity_of, public_key_fingerprint

SCHEME: Final = "keybroker-pair"
VERSION: Final = 1
#: Longer text is refused unread (a code is printed on a label; 200 is generous).
MAX_CODE_LENGTH: Final = 256
_CODE_RE: Final = re.compile(
    r"keybroker-pair:V:(?P<v>[0-9]+);S:(?P<s>[^;:]+);M:(?P<m>[^;:]+);"
    r"P:(?P<p>[^;:]+);K:(?P<k>[A-Za-z0-9_-]{43});;"
)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class PairingCode:
    """A device's identification info and the SHA-256 of its public key."""

    identity: DeviceIdentity
    key_sha256: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key_sha256, bytes) or len(self.key_sha256) != 32:
            raise DecodeError("a pairing code's key hash is 32 bytes (SHA-256)")

    @classmethod
    def for_certificate(cls, cert: x509.Certificate) -> PairingCode:
        """The code the manufacturer prints for the device ``cert`` certifies."""
        return cls(device_identity_of(cert), public_key_fingerprint(cert.public_key()))

    @classmethod
    def from_uri(cls, text: str) -> PairingCode:
        """Parse a ``keybroker-pair:`` URI; :class:`DecodeError` for anything else."""
        if not isinstance(text, str) or len(text) > MAX_CODE_LENGTH:
            raise DecodeError("not a keybroker pairing code")
        match = _CODE_RE.fullmatch(text.strip())
        if match is None:
            raise DecodeError("not a keybroker pairing code (keybroker-pair:V:1;S:…;M:…;P:…;K:…;;)")
        if match["v"] != str(VERSION):
            raise DecodeError(f"pairing code version {match['v'][:8]} is not supported")
        try:
            key_sha256 = base64.urlsafe_b64decode(match["k"] + "=")
        except (binascii.Error, ValueError):
            raise DecodeError("pairing code key hash is not base64url") from None
        code = cls(DeviceIdentity(match["s"], match["m"], match["p"]), key_sha256)
        if code.to_uri() != text.strip():
            # e.g. an upper-case MAC or non-canonical base64: one string per code.
            raise DecodeError("pairing code is not in canonical form")
        return code

    def to_uri(self) -> str:
        ident = self.identity
        return (
            f"{SCHEME}:V:{VERSION};S:{ident.serial};M:{ident.hardware_id};"
            f"P:{ident.model};K:{_b64url(self.key_sha256)};;"
        )

    def __str__(self) -> str:
        return self.to_uri()
