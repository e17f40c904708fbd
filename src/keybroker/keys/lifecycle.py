"""The key-version lifecycle: states, operations and the one table that links them.

Everything that decides whether a key version may change state lives in this
file. A version is born ``pending`` (:meth:`Keyset.add`); after that the only
moves are the ones in :data:`TRANSITIONS`. A ``(state, operation)`` pair that
is not in the table is forbidden and raises :class:`KeyStateError`.

Promotion has one side effect the table cannot show: the version that was
primary becomes :data:`DEMOTED_PRIMARY`. Because the primary can be neither
disabled nor destroyed, a keyset that has ever had a primary always has
exactly one.

Which states may *use* key material:

* only the primary produces (encrypt, sign, compute a MAC, seal);
* pending, primary and enabled versions consume (decrypt, verify, open).
  A pending version consumes so that rotation can be make-before-break:
  install the new version everywhere for receiving first, then promote it.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final

from keybroker.errors import KeyStateError


class KeyState(StrEnum):
    PENDING = "pending"
    PRIMARY = "primary"
    ENABLED = "enabled"
    DISABLED = "disabled"
    DESTROYED = "destroyed"


class KeyOp(StrEnum):
    PROMOTE = "promote"
    DISABLE = "disable"
    ENABLE = "enable"
    DESTROY = "destroy"


#: ``(state, operation) -> next state``. Anything not listed is forbidden.
TRANSITIONS: Final[Mapping[tuple[KeyState, KeyOp], KeyState]] = MappingProxyType(
    {
        (KeyState.PENDING, KeyOp.PROMOTE): KeyState.PRIMARY,
        (KeyState.ENABLED, KeyOp.PROMOTE): KeyState.PRIMARY,
        (KeyState.PENDING, KeyOp.DISABLE): KeyState.DISABLED,
        (KeyState.ENABLED, KeyOp.DISABLE): KeyState.DISABLED,
        (KeyState.DISABLED, KeyOp.ENABLE): KeyState.ENABLED,
        (KeyState.DISABLED, KeyOp.DESTROY): KeyState.DESTROYED,
    }
)

#: What the previous primary becomes when another version is promoted.
DEMOTED_PRIMARY: Final = KeyState.ENABLED

#: States whose versions may decrypt, verify and open.
CONSUMING_STATES: Final = frozenset({KeyState.PENDING, KeyState.PRIMARY, KeyState.ENABLED})

#: States that still hold secret material (everything but destroyed).
MATERIAL_STATES: Final = frozenset(KeyState) - {KeyState.DESTROYED}


def next_state(state: KeyState, op: KeyOp) -> KeyState:
    """The state ``op`` moves a version in ``state`` to; :class:`KeyStateError` if forbidden."""
    try:
        return TRANSITIONS[(state, op)]
    except KeyError:
        raise KeyStateError(f"cannot {op.value} a {state.value} key version") from None
