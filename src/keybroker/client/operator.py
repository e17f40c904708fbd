"""The operator's SDK: tokens, principals, keysets, grants, deliveries, rotations and the log.

Every call sends ``Authorization: Bearer <admin token>`` over TLS pinned to
the broker CA and returns the API's response model
(:mod:`keybroker.api.schemas`); errors come back as the
:mod:`keybroker.errors` class the server raised.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from keybroker.api import rotation_schemas as rotation
from keybroker.api import schemas
from keybroker.client._http import DEFAULT_TIMEOUT, Connection
from keybroker.client.logcheck import LogClient
from keybroker.pki import PrincipalId

_M = TypeVar("_M", bound=BaseModel)
GrantMode = Literal["use", "hold"]
VersionAction = Literal["promote", "enable", "disable", "destroy"]

# Keyset names keep their '/' in paths (the API matches them with {name:path});
# the other characters a name may hold (. _ : @ + -) are legal in a path as they are.
_KEYSET_SAFE = "/:@+"


def _seconds(ttl: timedelta | int) -> int:
    return int(ttl.total_seconds()) if isinstance(ttl, timedelta) else int(ttl)


def keyset_path(name: str) -> str:
    return "/v1/keysets/" + quote(name, safe=_KEYSET_SAFE)


def _rollout_path(rollout_id: str) -> str:
    return "/v1/rotations/" + quote(rollout_id, safe="")


class OperatorClient:
    """``async with OperatorClient(url, admin_token, ca_pem) as op: ...``"""

    def __init__(
        self,
        url: str,
        admin_token: str,
        ca_pem: bytes | str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._conn = Connection(url, ca_pem, transport=transport, timeout=timeout)
        self._auth = {"authorization": f"Bearer {admin_token}"}
        self._log: LogClient | None = None

    def __repr__(self) -> str:
        # Never the token.
        return f"OperatorClient({self._conn.url!r})"

    async def __aenter__(self) -> OperatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._conn.aclose()

    async def _call(self, model: type[_M], method: str, path: str, **kwargs: Any) -> _M:
        return await self._conn.call(model, method, path, headers=self._auth, **kwargs)

    # -- public ------------------------------------------------------------------------

    async def health(self) -> schemas.Health:
        return await self._conn.call(schemas.Health, "GET", "/v1/health")

    async def ca_pem(self) -> str:
        return await self._conn.text("/v1/ca")

    # -- enrolment tokens and principals -----------------------------------------------

    async def create_enrolment_token(
        self,
        principal: PrincipalId | str,
        ttl: timedelta | int = timedelta(hours=24),
        *,
        dns_names: Iterable[str] = (),
    ) -> schemas.EnrolmentTokenIssued:
        """A one-time token; a ``service``'s may name DNS names for its (TLS server) certificate."""
        body = schemas.EnrolmentTokenCreate(
            principal=str(principal), ttl_seconds=_seconds(ttl), dns_names=list(dns_names)
        )
        return await self._call(
            schemas.EnrolmentTokenIssued, "POST", "/v1/enrolment-tokens", body=body
        )

    async def list_principals(self, *, status: str | None = None) -> list[schemas.PrincipalOut]:
        out = await self._call(
            schemas.PrincipalList, "GET", "/v1/principals", params={"status": status}
        )
        return out.principals

    async def show_principal(self, principal: PrincipalId | str) -> schemas.PrincipalOut:
        return await self._call(schemas.PrincipalOut, "GET", f"/v1/principals/{principal}")

    async def revoke_principal(
        self, principal: PrincipalId | str, *, reason: schemas.RevocationReason = "unspecified"
    ) -> schemas.PrincipalOut:
        return await self._call(
            schemas.PrincipalOut,
            "POST",
            f"/v1/principals/{principal}/revoke",
            body=schemas.PrincipalRevoke(reason=reason),
        )

    # -- keysets ----------------------------------------------------------------------

    async def create_keyset(self, name: str, template: str) -> schemas.KeysetOut:
        body = schemas.KeysetCreate(name=name, template=template)
        return await self._call(schemas.KeysetOut, "POST", "/v1/keysets", body=body)

    async def list_keysets(self) -> list[schemas.KeysetOut]:
        return (await self._call(schemas.KeysetList, "GET", "/v1/keysets")).keysets

    async def show_keyset(self, name: str) -> schemas.KeysetOut:
        return await self._call(schemas.KeysetOut, "GET", keyset_path(name))

    async def rotate_keyset(
        self, name: str, *, template: str | None = None
    ) -> schemas.KeyVersionOut:
        return await self._call(
            schemas.KeyVersionOut,
            "POST",
            keyset_path(name) + "/rotate",
            body=schemas.KeysetRotate(template=template),
        )

    async def change_version(
        self, name: str, version: int, action: VersionAction
    ) -> schemas.KeyVersionOut:
        path = f"{keyset_path(name)}/versions/{int(version)}/{action}"
        return await self._call(schemas.KeyVersionOut, "POST", path)

    async def promote_version(self, name: str, version: int) -> schemas.KeyVersionOut:
        return await self.change_version(name, version, "promote")

    async def enable_version(self, name: str, version: int) -> schemas.KeyVersionOut:
        return await self.change_version(name, version, "enable")

    async def disable_version(self, name: str, version: int) -> schemas.KeyVersionOut:
        return await self.change_version(name, version, "disable")

    async def destroy_version(self, name: str, version: int) -> schemas.KeyVersionOut:
        return await self.change_version(name, version, "destroy")

    # -- grants ------------------------------------------------------------------------

    async def grant(
        self, principal: PrincipalId | str, keyset: str, mode: GrantMode
    ) -> schemas.GrantOut:
        body = schemas.GrantIn(principal=str(principal), keyset=keyset, mode=mode)
        return await self._call(schemas.GrantOut, "POST", "/v1/grants", body=body)

    async def revoke_grant(
        self, principal: PrincipalId | str, keyset: str, mode: GrantMode
    ) -> schemas.GrantOut:
        body = schemas.GrantIn(principal=str(principal), keyset=keyset, mode=mode)
        return await self._call(schemas.GrantOut, "POST", "/v1/grants/revoke", body=body)

    async def list_grants(
        self,
        *,
        principal: PrincipalId | str | None = None,
        keyset: str | None = None,
        include_revoked: bool = False,
    ) -> list[schemas.GrantOut]:
        params = {
            "principal": None if principal is None else str(principal),
            "keyset": keyset,
            "include_revoked": "true" if include_revoked else None,
        }
        return (await self._call(schemas.GrantList, "GET", "/v1/grants", params=params)).grants

    # -- deliveries -------------------------------------------------------------------

    async def deliver(
        self,
        keyset: str,
        version: int,
        principal: PrincipalId | str,
        ttl: timedelta | int = timedelta(hours=1),
    ) -> schemas.DeliveryOut:
        body = schemas.DeliveryCreate(
            keyset=keyset, version=version, principal=str(principal), ttl_seconds=_seconds(ttl)
        )
        return await self._call(schemas.DeliveryOut, "POST", "/v1/deliveries", body=body)

    async def list_deliveries(
        self,
        *,
        principal: PrincipalId | str | None = None,
        keyset: str | None = None,
        state: str | None = None,
    ) -> list[schemas.DeliveryOut]:
        params = {
            "principal": None if principal is None else str(principal),
            "keyset": keyset,
            "state": state,
        }
        out = await self._call(schemas.DeliveryList, "GET", "/v1/deliveries/records", params=params)
        return out.deliveries

    async def show_delivery(self, delivery_id: str) -> schemas.DeliveryOut:
        return await self._call(
            schemas.DeliveryOut, "GET", f"/v1/deliveries/{quote(delivery_id, safe='')}"
        )

    # -- rotations (S10) ---------------------------------------------------------------
    # ``topology`` is the document ``Topology.to_mapping()`` makes (the TOML file as JSON).

    async def setup_rotation(
        self, topology: Mapping[str, Any], delivery_ttl: timedelta | int = timedelta(hours=1)
    ) -> rotation.SetupOut:
        body = rotation.RotationSetup(
            topology=dict(topology), delivery_ttl_seconds=_seconds(delivery_ttl)
        )
        return await self._call(rotation.SetupOut, "POST", "/v1/rotations/setup", body=body)

    async def start_rollout(
        self,
        topology: Mapping[str, Any],
        *,
        links: Iterable[str] | None = None,
        policy: rotation.RolloutPolicyIn | None = None,
    ) -> rotation.RolloutOut:
        body = rotation.RolloutCreate(
            topology=dict(topology),
            links=None if links is None else list(links),
            policy=policy or rotation.RolloutPolicyIn(),
        )
        return await self._call(rotation.RolloutOut, "POST", "/v1/rotations", body=body)

    async def list_rollouts(self) -> list[rotation.RolloutSummary]:
        return (await self._call(rotation.RolloutList, "GET", "/v1/rotations")).rollouts

    async def show_rollout(
        self,
        rollout_id: str,
        *,
        states: Iterable[str] | None = None,
        limit: int = rotation.DEFAULT_PAGE,
        offset: int = 0,
    ) -> rotation.RolloutOut:
        """A rollout with one page of its links (``limit=0``: counts only)."""
        params = {"state": list(states or ()) or None, "limit": limit, "offset": offset}
        return await self._call(
            rotation.RolloutOut, "GET", _rollout_path(rollout_id), params=params
        )

    async def rollout_with_links(
        self, rollout_id: str, *, states: Iterable[str] | None = None
    ) -> rotation.RolloutOut:
        """A rollout with every link (that is in ``states``), fetched page by page."""
        wanted = list(states or ())
        first = await self.show_rollout(rollout_id, states=wanted, limit=rotation.MAX_PAGE)
        links = list(first.links)
        while len(links) < first.matched:
            page = await self.show_rollout(
                rollout_id, states=wanted, limit=rotation.MAX_PAGE, offset=len(links)
            )
            if not page.links:
                break  # the rollout changed under us; what was read is returned
            links += page.links
        return first.model_copy(update={"links": links})

    async def abort_rollout(self, rollout_id: str) -> rotation.RolloutOut:
        return await self._call(rotation.RolloutOut, "POST", _rollout_path(rollout_id) + "/abort")

    async def retry_rollout(
        self, rollout_id: str, *, links: Iterable[str] | None = None
    ) -> rotation.RolloutOut:
        body = rotation.RolloutRetry(links=None if links is None else list(links))
        return await self._call(
            rotation.RolloutOut, "POST", _rollout_path(rollout_id) + "/retry", body=body
        )

    # -- the log -----------------------------------------------------------------------

    async def log_public_key(self) -> bytes:
        """The log's Ed25519 public key (raw), as served; pin it on first use."""
        out = await self._conn.call(schemas.LogPublicKey, "GET", "/v1/log/public-key")
        return out.public_key

    async def log(self, public_key: bytes | None = None) -> LogClient:
        """A :class:`LogClient`. Without ``public_key`` the log key is fetched once over the
        pinned TLS connection; pass the one you recorded to check the broker against it."""
        if self._log is None or public_key is not None:
            if public_key is None:
                public_key = await self.log_public_key()
            self._log = LogClient(self._conn, public_key, headers=self._auth)
        return self._log
