"""Wire formats of ``/v1/rotations`` (S10 staged key rotation), shared with the SDK.

The conventions of :mod:`keybroker.api.schemas` hold, with one exception: a
rollout's **policy is in milliseconds** (``ack_timeout_ms`` …). It is the unit
the policy is stored and logged in (its hash is in the ``RolloutStarted`` log
entry), so what an operator sends is exactly what the log commits to and what
``GET /v1/rotations/{id}`` shows back, with no rounding either way. Every
field name says its unit. ``delivery_ttl_seconds`` of setup is a delivery TTL
like any other, in whole seconds.

The topology is the document :meth:`Topology.from_mapping
<keybroker.flows.rotation.topology.Topology.from_mapping>` reads (the TOML file,
as JSON). Its schema below is descriptive; the broker checks it in full and
answers a bad one with a 400 ``protocol/decode`` problem that names the first
mistake, before anything changes.

Like :mod:`keybroker.api.schemas`, this module needs pydantic only (and imports no
flow), so the SDK uses it without the server.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import Field, WithJsonSchema, field_validator, model_validator

from keybroker.api.schemas import Request, Response, TtlSeconds

#: The per-link states of :class:`keybroker.flows.rotation.protocol.LinkState`.
LINK_STATES: Final = (
    "PENDING",
    "DELIVERED_DOWNSTREAM",
    "ACKED_DOWNSTREAM",
    "DELIVERED_UPSTREAM",
    "ACTIVE",
    "RETIRED_OLD",
    "FAILED_KEEP_OLD",
    "ABORTED_KEEP_OLD",
)
#: States in which a link still transmits under its original key at the end of a rollout.
KEPT_OLD_STATES: Final = ("FAILED_KEEP_OLD", "ABORTED_KEEP_OLD")
LinkStateName = Literal[
    "PENDING",
    "DELIVERED_DOWNSTREAM",
    "ACKED_DOWNSTREAM",
    "DELIVERED_UPSTREAM",
    "ACTIVE",
    "RETIRED_OLD",
    "FAILED_KEEP_OLD",
    "ABORTED_KEEP_OLD",
]
#: Rollout states of :mod:`keybroker.flows.rotation.orchestrator`.
ROLLOUT_STATES: Final = ("RUNNING", "HALTED", "ABORTED", "COMPLETED")

#: ``topology.MAX_LINKS``.
MAX_LINKS: Final = 100_000
#: Links in one page of a rollout's status, unless asked otherwise.
DEFAULT_PAGE: Final = 1000
MAX_PAGE: Final = 10_000
ROLLOUT_ID_MAX: Final = 36
_MAX_MS: Final = 30 * 86_400_000
_NAME: Final = r"[a-z0-9][a-z0-9._-]{0,31}"
LINK_PATTERN: Final = rf"^{_NAME}/{_NAME}$"

LinkName = Annotated[
    str,
    Field(pattern=LINK_PATTERN, max_length=65, examples=["up1-a/fra1"]),
]

_NAMES_SCHEMA: Final[dict[str, Any]] = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "string"},
}
#: Descriptive, and never stricter than what the broker checks (see the module docstring).
TOPOLOGY_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "title": "Topology",
    "description": (
        "Upstream nodes, downstream sites and the links between them; each link is one "
        "AEAD keyset (default name `rotation/<name>/<node>/<site>`) held by `node/<node>` "
        "and `site/<site>`."
    ),
    "required": ["name", "upstream", "downstream", "links"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "examples": ["core"]},
        "upstream": {
            "type": "object",
            "required": ["site", "nodes"],
            "additionalProperties": False,
            "properties": {"site": {"type": "string"}, "nodes": _NAMES_SCHEMA},
        },
        "downstream": {
            "type": "object",
            "required": ["sites"],
            "additionalProperties": False,
            "properties": {"sites": _NAMES_SCHEMA},
        },
        "links": {
            "type": "array",
            "minItems": 1,
            "maxItems": MAX_LINKS,
            "items": {
                "type": "object",
                "required": ["node", "site"],
                "additionalProperties": False,
                "properties": {
                    "node": {"type": "string"},
                    "site": {"type": "string"},
                    "keyset": {"type": "string", "description": "an existing keyset to use"},
                },
            },
        },
    },
}
TopologyDocument = Annotated[dict[str, Any], WithJsonSchema(TOPOLOGY_SCHEMA)]


def _distinct(links: list[str] | None) -> list[str] | None:
    if links is not None and len(set(links)) != len(links):
        raise ValueError("a link is named twice")
    return links


# -- requests ----------------------------------------------------------------------------


class RotationSetup(Request):
    """Make every link of a topology ready: keysets, ``hold`` grants, first keys delivered."""

    topology: TopologyDocument
    delivery_ttl_seconds: TtlSeconds = 3600


class RolloutPolicyIn(Request):
    """How patient a rollout is. Milliseconds (see the module docstring)."""

    ack_timeout_ms: Annotated[
        int,
        Field(
            ge=1,
            le=_MAX_MS,
            description="How long a site or node has to install and acknowledge (delivery TTL)",
        ),
    ] = 60_000
    max_attempts: Annotated[
        int,
        Field(ge=1, le=100, description="Deliveries per stage before the link keeps its old key"),
    ] = 3
    backoff_base_ms: Annotated[
        int, Field(ge=1, le=_MAX_MS, description="Backoff before attempt n+1: base * 2**(n-1)")
    ] = 2_000
    backoff_cap_ms: Annotated[
        int | None,
        Field(
            ge=1,
            le=_MAX_MS,
            description="Longest backoff (plus up to 20 % jitter); default max(60 s, base)",
        ),
    ] = None
    grace_ms: Annotated[
        int,
        Field(
            ge=0,
            le=_MAX_MS,
            description=(
                "How long the old key is still accepted once the new one transmits; must "
                "cover the agents' sync interval and the longest a message can be in flight"
            ),
        ),
    ] = 30_000
    max_failed_percent: Annotated[
        int,
        Field(ge=0, le=100, description="Halt (start no new link) once more than this % failed"),
    ] = 100
    max_parallel: Annotated[
        int,
        Field(ge=0, le=1_000_000, description="Links between PENDING and ACTIVE at once (0: any)"),
    ] = 0

    @model_validator(mode="after")
    def _cap_covers_base(self) -> RolloutPolicyIn:
        if self.backoff_cap_ms is not None and self.backoff_cap_ms < self.backoff_base_ms:
            raise ValueError("backoff_cap_ms must be at least backoff_base_ms")
        return self

    def cap_ms(self) -> int:
        return self.backoff_cap_ms or max(60_000, self.backoff_base_ms)


class RolloutCreate(Request):
    """Start a rollout over the links of ``topology`` (all of them, or those in ``links``)."""

    topology: TopologyDocument
    links: Annotated[
        list[LinkName] | None,
        Field(
            min_length=1,
            max_length=MAX_LINKS,
            description="`node/site` names of the links to rotate; default: every link",
        ),
    ] = None
    policy: Annotated[RolloutPolicyIn, Field(default_factory=RolloutPolicyIn)]

    @field_validator("links")
    @classmethod
    def _links_distinct(cls, links: list[str] | None) -> list[str] | None:
        return _distinct(links)


class RolloutRetry(Request):
    """Retry failed or aborted links (default: all of them)."""

    links: Annotated[list[LinkName] | None, Field(min_length=1, max_length=MAX_LINKS)] = None

    @field_validator("links")
    @classmethod
    def _links_distinct(cls, links: list[str] | None) -> list[str] | None:
        return _distinct(links)


# -- responses ---------------------------------------------------------------------------


class SetupOut(Response):
    keysets_created: int
    grants_created: int
    deliveries: int


class RolloutPolicyOut(Response):
    ack_timeout_ms: int
    max_attempts: int
    backoff_base_ms: int
    backoff_cap_ms: int
    grace_ms: int
    max_failed_percent: int
    max_parallel: int


class LinkOut(Response):
    """One link of a rollout. ``version_in_use`` is the version both ends transmit under."""

    name: str = Field(description="`node/site`")
    node: str
    site: str
    keyset: str
    state: str = Field(description="One of " + ", ".join(LINK_STATES))
    old_version: int
    new_version: int | None
    attempt: int = Field(description="Deliveries made at the current stage")
    reason: str | None = Field(description="Why the last attempt failed, or why the link gave up")
    version_in_use: int
    updated_at: datetime


class RolloutSummary(Response):
    rollout_id: str
    topology: str
    state: str = Field(description="One of " + ", ".join(ROLLOUT_STATES))
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    finished: bool
    reason: str | None


class RolloutOut(RolloutSummary):
    """A rollout, its policy, how many links are in each state, and one page of its links."""

    policy: RolloutPolicyOut
    counts: dict[str, int] = Field(description="Links in each state (every state is listed)")
    total: int = Field(description="Links in the rollout")
    matched: int = Field(description="Links that match the `state` filter (all, without one)")
    offset: int
    links: list[LinkOut] = Field(description="Links `offset` … `offset + limit` of those matched")


class RolloutList(Response):
    rollouts: list[RolloutSummary] = Field(description="Newest first")


__all__ = [
    "DEFAULT_PAGE",
    "KEPT_OLD_STATES",
    "LINK_STATES",
    "MAX_LINKS",
    "MAX_PAGE",
    "ROLLOUT_ID_MAX",
    "ROLLOUT_STATES",
    "TOPOLOGY_SCHEMA",
    "LinkName",
    "LinkOut",
    "LinkStateName",
    "RolloutCreate",
    "RolloutList",
    "RolloutOut",
    "RolloutPolicyIn",
    "RolloutPolicyOut",
    "RolloutRetry",
    "RolloutSummary",
    "RotationSetup",
    "SetupOut",
]
