"""The one token that opens raw key bytes.

Modelled on Tink's ``secret_key_access.TOKEN``: every call that lets secret key
material in or out of :mod:`keybroker.keys` takes :data:`SECRET_ACCESS` as an
argument, so an audit finds every such place with one grep for
``SECRET_ACCESS``. The token proves nothing cryptographically; it makes the
dangerous call impossible to write by accident.
"""

from __future__ import annotations

from typing import Final, final


@final
class SecretAccessToken:
    """Type of :data:`SECRET_ACCESS`. There is exactly one instance."""

    __slots__ = ()
    _instance: SecretAccessToken | None = None

    def __new__(cls) -> SecretAccessToken:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "keybroker.keys.SECRET_ACCESS"


SECRET_ACCESS: Final = SecretAccessToken()


def require_secret_access(token: object) -> None:
    """Raise :class:`TypeError` unless ``token`` is :data:`SECRET_ACCESS`."""
    if token is not SECRET_ACCESS:
        raise TypeError("raw key material needs keybroker.keys.SECRET_ACCESS")
