"""The API keeps validated identity keys per certificate fingerprint; revocation, a new
certificate and the validity window still take effect on the very next request."""

from __future__ import annotations

from datetime import timedelta

import pytest
from api_kit import Env

from keybroker.errors import AuthorizationError


async def test_revoking_a_principal_refuses_its_next_request_despite_the_cache(env: Env) -> None:
    client = await env.enrolled("node/n1")
    await client.holdings()  # the certificate is validated and its key kept
    ctx = env.app.state.keybroker
    assert len(ctx.verified_keys._keys) >= 1
    env.broker.revoke_principal("node/n1")
    with pytest.raises(AuthorizationError, match="revoked"):
        await client.holdings()


async def test_a_cached_key_is_not_used_outside_its_certificate_window(env: Env) -> None:
    client = await env.enrolled("node/n2")
    await client.holdings()
    env.clock.advance(timedelta(days=400))  # past the identity certificate's notAfter
    with pytest.raises(AuthorizationError):
        await client.holdings()


async def test_a_keyed_wake_reaches_only_that_keys_waiters_and_events_do_not_pile_up() -> None:
    import gc

    from keybroker.api.auth import KeyedWaker

    waker = KeyedWaker()
    a, b = waker.current("login/a"), waker.current("login/b")
    assert waker.current("login/a") is a
    waker.wake("login/a")
    assert a.is_set() and not b.is_set()
    assert waker.current("login/a") is not a  # a fresh event for the next wait
    waker.wake("login/unknown")  # nobody waits: nothing happens
    del a, b
    gc.collect()
    assert len(waker._events) == 0
