"""Keysets at rest: one ``keysets`` row and one ``key_versions`` row per version.

Material is wrapped under the root key (:class:`~keybroker.keys.KeyEncryptionKey`)
with AAD = ``version_aad(keyset name, version)``, so a wrapped row moved to
another keyset or version no longer opens. Existing versions are never
re-wrapped on save: only their state changes, and a destroyed version's
material is overwritten with NULL in the same transaction that records it.

Writers compare-and-set ``keysets.revision``: two replicas that loaded the same
revision cannot both save, the second gets :class:`~keybroker.errors.Conflict`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from keybroker.errors import Conflict, LocalProtocolError, NotFound
from keybroker.keys import KeyEncryptionKey, Keyset, KeyState, WrappedVersion
from keybroker.store.bulk import bulk_update
from keybroker.store.engine import Store
from keybroker.store.schema import key_versions, keysets


@dataclass(frozen=True)
class StoredKeyset:
    """A keyset loaded from the store, with the revision to hand back on save."""

    keyset: Keyset
    id: str
    revision: int
    #: Each stored version's state at that revision. Saving compares against this
    #: instead of reading the rows again: the compare-and-set on ``revision`` proves
    #: nobody changed them since.
    stored_states: Mapping[int, str] = field(repr=False)


class KeysetRepository:
    def __init__(
        self, store: Store, root_key: KeyEncryptionKey, clock: Callable[[], datetime]
    ) -> None:
        self._store = store
        self._kek = root_key
        self._clock = clock

    def __repr__(self) -> str:
        return f"KeysetRepository({self._store!r}, kek={self._kek.kek_id})"

    @contextmanager
    def _tx(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
        else:
            with self._store.transaction() as own:
                yield own

    def create(self, keyset: Keyset, *, conn: Connection | None = None) -> StoredKeyset:
        """Store a new keyset; :class:`Conflict` if the name is taken."""
        now = self._clock()
        keyset_id = str(uuid.uuid4())
        with self._tx(conn) as tx:
            taken = tx.execute(sa.select(keysets.c.id).where(keysets.c.name == keyset.name))
            if taken.first() is not None:
                raise Conflict(f"keyset {keyset.name!r} already exists")
            tx.execute(
                keysets.insert().values(
                    id=keyset_id,
                    name=keyset.name,
                    purpose=keyset.purpose.value,
                    template=_template_of(keyset),
                    revision=1,
                    created_at=now,
                    updated_at=now,
                )
            )
            wrapped = list(keyset.wrapped_versions(self._kek))
            if wrapped:
                tx.execute(key_versions.insert(), [self._row(keyset_id, w, now) for w in wrapped])
        states = {w.version: KeyState(w.state).value for w in wrapped}
        return StoredKeyset(keyset, keyset_id, 1, states)

    def load(self, name: str, *, conn: Connection | None = None) -> StoredKeyset:
        """The keyset called ``name``; :class:`NotFound` if there is none."""
        found = self.load_many([name], conn=conn)
        if name not in found:
            raise NotFound(f"no keyset {name!r}")
        return found[name]

    def load_many(
        self, names: Iterable[str], *, conn: Connection | None = None
    ) -> dict[str, StoredKeyset]:
        """Each of ``names`` that exists, by name, in two queries per 500 names."""
        return self._load(names, conn, None)

    def load_versions(
        self, wanted: Mapping[str, Iterable[int]], *, conn: Connection | None = None
    ) -> dict[str, Keyset]:
        """Each keyset of ``wanted`` that exists, holding only the versions named (those
        that exist), for reading: checking a proof of possession needs one version, and
        unwrapping the others would cost as much again. Not for saving (no revision)."""
        only = {name: set(versions) for name, versions in wanted.items()}
        return {name: s.keyset for name, s in self._load(only, conn, only).items()}

    def _load(
        self,
        names: Iterable[str],
        conn: Connection | None,
        only: Mapping[str, set[int]] | None,
    ) -> dict[str, StoredKeyset]:
        wanted = sorted(set(names))
        found: dict[str, StoredKeyset] = {}
        with self._tx(conn) as tx:
            for start in range(0, len(wanted), 500):
                part = wanted[start : start + 500]
                heads = tx.execute(_HEADS, {"names": part}).all()
                if not heads:
                    continue
                versions: dict[str, list[WrappedVersion]] = {h.id: [] for h in heads}
                keep = None if only is None else {h.id: only[h.name] for h in heads}
                for r in tx.execute(_VERSIONS, {"ids": list(versions)}):
                    if keep is not None and r.version not in keep[r.keyset_id]:
                        continue
                    versions[r.keyset_id].append(
                        WrappedVersion(
                            version=r.version,
                            key_id=r.key_id,
                            state=KeyState(r.state),
                            template=r.template,
                            public_key=r.public_key,
                            wrapped_material=r.wrapped_material,
                            kek_id=r.kek_id,
                            created_at=r.created_at,
                            state_changed_at=r.state_changed_at,
                        )
                    )
                for head in heads:
                    wrapped = versions[head.id]
                    keyset = Keyset.from_wrapped(head.name, head.purpose, wrapped, self._kek)
                    states = {w.version: KeyState(w.state).value for w in wrapped}
                    found[head.name] = StoredKeyset(keyset, head.id, head.revision, states)
        return found

    def save(self, stored: StoredKeyset, *, conn: Connection | None = None) -> StoredKeyset:
        """Write the keyset's changes since it was loaded; :class:`Conflict` if someone else
        saved it in between."""
        return self.save_many([stored], conn=conn)[0]

    def save_many(
        self, changed: Sequence[StoredKeyset], *, conn: Connection | None = None
    ) -> list[StoredKeyset]:
        """:meth:`save` for several keysets (each at most once), one statement per kind
        of write; :class:`Conflict` if any of them was saved by someone else."""
        if not changed:
            return []
        if len({c.id for c in changed}) != len(changed):
            raise LocalProtocolError("save_many: a keyset is named twice")
        now = self._clock()
        bumps: list[dict[str, object]] = []
        inserts: list[dict[str, object]] = []
        moves: list[dict[str, object]] = []
        destroys: list[dict[str, object]] = []
        saved: list[StoredKeyset] = []
        for stored in changed:
            keyset, existing = stored.keyset, stored.stored_states
            bumps.append(
                {
                    "b_id": stored.id,
                    "b_revision": stored.revision,
                    "b_next": stored.revision + 1,
                    "b_now": now,
                    "b_template": _template_of(keyset),
                }
            )
            states: dict[int, str] = {}
            for info in keyset.versions:
                states[info.version] = info.state.value
                if info.version not in existing:
                    wrapped = keyset.wrap_version(info.version, self._kek)
                    inserts.append(self._row(stored.id, wrapped, now))
                elif existing[info.version] != info.state.value:
                    (destroys if info.state is KeyState.DESTROYED else moves).append(
                        {
                            "b_keyset": stored.id,
                            "b_version": info.version,
                            "b_state": info.state.value,
                            "b_changed": info.state_changed_at or now,
                        }
                    )
            saved.append(StoredKeyset(keyset, stored.id, stored.revision + 1, states))
        with self._tx(conn) as tx:
            if _BUMP.run(tx, bumps) != len(bumps):
                names = ", ".join(repr(c.keyset.name) for c in changed[:3])
                raise Conflict(f"keyset {names} was changed by someone else; reload it")
            if inserts:
                tx.execute(_INSERT_VERSION, inserts)
            if _SET_STATE.run(tx, moves) != len(moves):
                raise Conflict("a key version was changed by someone else; reload it")
            if destroys:
                tx.execute(_DESTROY, destroys)
        return saved

    def names(self, *, conn: Connection | None = None) -> list[str]:
        with self._tx(conn) as tx:
            return list(tx.execute(sa.select(keysets.c.name).order_by(keysets.c.name)).scalars())

    def _row(self, keyset_id: str, w: WrappedVersion, now: datetime) -> dict[str, object]:
        return {
            "keyset_id": keyset_id,
            "version": w.version,
            "key_id": w.key_id,
            "state": KeyState(w.state).value,
            "template": w.template,
            "public_key": w.public_key,
            "wrapped_material": w.wrapped_material,
            "kek_id": w.kek_id,
            "created_at": w.created_at or now,
            "state_changed_at": w.state_changed_at or now,
        }


# Built once: constructing a statement costs more than executing it on SQLite.
# Both run as one statement per batch on PostgreSQL (keybroker.store.bulk).
_BUMP: Final = bulk_update(
    keysets,
    match={"id": "b_id", "revision": "b_revision"},
    assign={"revision": "b_next", "updated_at": "b_now", "template": "b_template"},
)
_INSERT_VERSION: Final = key_versions.insert()
_SET_STATE: Final = bulk_update(
    key_versions,
    match={"keyset_id": "b_keyset", "version": "b_version"},
    assign={"state": "b_state", "state_changed_at": "b_changed"},
)
#: A destroyed version's material is overwritten with NULL in the same statement.
_DESTROY: Final = _SET_STATE.per_row.values(wrapped_material=None)
_HEADS: Final = sa.select(
    keysets.c.name, keysets.c.id, keysets.c.purpose, keysets.c.revision
).where(keysets.c.name.in_(sa.bindparam("names", expanding=True)))
_VERSIONS: Final = (
    sa.select(key_versions)
    .where(key_versions.c.keyset_id.in_(sa.bindparam("ids", expanding=True)))
    .order_by(key_versions.c.keyset_id, key_versions.c.version)
)


def _template_of(keyset: Keyset) -> str:
    """The template new versions get: the primary's, else the newest version's."""
    info = keyset.primary or (keyset.versions[-1] if keyset.versions else None)
    return info.template.name if info is not None else ""
