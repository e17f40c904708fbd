"""Principal identifiers: ``<kind>/<name>``, carried in certificates as ``keybroker://<kind>/<name>``."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from keybroker.errors import DecodeError

URI_SCHEME = "keybroker"
URI_PREFIX = f"{URI_SCHEME}://"

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")

#: The whole ``<kind>/<name>`` goes into the subject CN, whose upper bound is 64
#: characters (RFC 5280 Appendix A, ub-common-name); cryptography refuses longer.
MAX_PRINCIPAL_ID_LENGTH = 64


class PrincipalKind(enum.StrEnum):
    SITE = "site"
    NODE = "node"
    DEVICE = "device"
    SERVICE = "service"
    USER = "user"


@dataclass(frozen=True, slots=True)
class PrincipalId:
    """Who a certificate speaks for. Construction validates; a bad value raises DecodeError."""

    kind: PrincipalKind
    name: str

    def __post_init__(self) -> None:
        # Callers holding a plain string (from a form, a message) may pass it; it is checked here.
        object.__setattr__(self, "kind", _kind(self.kind))
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise DecodeError(f"malformed principal name {self.name!r:.80}")
        if len(str(self)) > MAX_PRINCIPAL_ID_LENGTH:
            raise DecodeError(f"principal id longer than {MAX_PRINCIPAL_ID_LENGTH} characters")

    @classmethod
    def parse(cls, text: str) -> PrincipalId:
        """Parse ``"site/fra1"``."""
        if not isinstance(text, str):
            raise DecodeError("principal id must be a string")
        kind, sep, name = text.partition("/")
        if not sep:
            raise DecodeError(f"malformed principal id {text!r:.80}")
        return cls(_kind(kind), name)

    @classmethod
    def from_uri(cls, uri: str) -> PrincipalId:
        """Parse ``"keybroker://site/fra1"``; the scheme must be exactly lower-case."""
        if not isinstance(uri, str) or not uri.startswith(URI_PREFIX):
            raise DecodeError("not a keybroker principal URI")
        return cls.parse(uri[len(URI_PREFIX) :])

    @property
    def uri(self) -> str:
        return f"{URI_PREFIX}{self.kind.value}/{self.name}"

    def __str__(self) -> str:
        return f"{self.kind.value}/{self.name}"


def _kind(value: object) -> PrincipalKind:
    if isinstance(value, PrincipalKind):
        return value
    if not isinstance(value, str):
        raise DecodeError("principal kind must be a string")
    try:
        return PrincipalKind(value)
    except ValueError:
        raise DecodeError(f"unknown principal kind {value!r:.80}") from None
