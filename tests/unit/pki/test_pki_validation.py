"""Path validation: one table, each row a chain and the outcome it must have.

Rows that must fail name the exact error type; the message is not asserted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519
from pki_builders import (
    CLIENT_AUTH,
    DAY,
    NOW,
    SECOND,
    SERVER_AUTH,
    SITE_A,
    World,
    flip_last_byte,
    key_usage,
    name,
    p256,
    raw_ca,
    raw_certificate,
)

from keybroker.errors import (
    CertificateError,
    CertificateExpired,
    CertificateInvalid,
    CertificateRevoked,
    ConfigurationError,
    LocalProtocolError,
)
from keybroker.pki import (
    DEFAULT_MAX_CHAIN_DEPTH,
    KEY_POLICY_WITH_RSA,
    CertificateAuthority,
    Revocation,
    certificate_der,
    load_certificate,
    verify_chain,
)


@dataclass
class Scenario:
    leaf: x509.Certificate
    intermediates: Sequence[x509.Certificate] = ()
    roots: Sequence[x509.Certificate] | None = None  # None: the world's root
    now: datetime = NOW
    crls: Sequence[x509.CertificateRevocationList] | None = None
    max_depth: int = DEFAULT_MAX_CHAIN_DEPTH
    require_client_auth: bool = True
    chain_length: int | None = None  # expected length of the returned chain, if it passes


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[World], Scenario]
    expect: type[CertificateError] | None = field(default=None)


def _leaf(world: World, **kwargs: object) -> x509.Certificate:
    """A raw leaf under the world's root (for profiles our CA will not issue)."""
    defaults: dict[str, object] = {
        "subject": name("site/a"),
        "issuer": world.root.name,
        "public_key": world.leaf_key.public_key(),
        "signing_key": world.root_key,
    }
    defaults.update(kwargs)
    return raw_certificate(**defaults)  # type: ignore[arg-type]


def _crl(
    ca: CertificateAuthority,
    revoked: Sequence[x509.Certificate] = (),
    *,
    now: datetime = NOW - DAY,
    next_update: datetime = NOW + 7 * DAY,
) -> x509.CertificateRevocationList:
    entries = [
        Revocation(cert.serial_number, now, x509.ReasonFlags.key_compromise) for cert in revoked
    ]
    return ca.issue_crl(entries, now, next_update, crl_number=1)


def _unlimited_root_chain(world: World, intermediates: int) -> Scenario:
    """root → i1 → … → i<n> → leaf, under a root with no path-length limit."""
    signer = p256()
    root = raw_ca("Deep Root", signer, path_length=None)
    issuer, chain = root.subject, []
    for depth in range(intermediates):
        key = p256()
        cert = raw_ca(f"Deep {depth}", key, issuer=issuer, signing_key=signer, path_length=None)
        chain.append(cert)
        issuer, signer = cert.subject, key
    leaf = _leaf(world, issuer=issuer, signing_key=signer)
    return Scenario(leaf, chain[::-1], roots=[root], chain_length=intermediates + 2)


def _expired_intermediate(world: World) -> Scenario:
    key = p256()
    inter = raw_ca(
        "Old Intermediate",
        key,
        issuer=world.root.name,
        signing_key=world.root_key,
        not_after=NOW - SECOND,
    )
    leaf = _leaf(world, issuer=inter.subject, signing_key=key)
    return Scenario(leaf, [inter])


def _future_intermediate(world: World) -> Scenario:
    key = p256()
    inter = raw_ca(
        "Early Intermediate",
        key,
        issuer=world.root.name,
        signing_key=world.root_key,
        not_before=NOW + SECOND,
    )
    leaf = _leaf(world, issuer=inter.subject, signing_key=key)
    return Scenario(leaf, [inter])


def _expired_root(world: World) -> Scenario:
    key = p256()
    root = raw_ca("Old Root", key, not_after=NOW - SECOND)
    leaf = _leaf(world, issuer=root.subject, signing_key=key)
    return Scenario(leaf, roots=[root])


def _forged_leaf(world: World) -> Scenario:
    # Same issuer name and even the genuine root's key identifier; only the signature is wrong.
    forger = p256()
    leaf = _leaf(world, signing_key=forger, aki_key=world.root_key.public_key())
    return Scenario(leaf)


def _forged_intermediate(world: World) -> Scenario:
    forger, key = p256(), p256()
    inter = raw_ca(
        "Test Intermediate", key, issuer=world.root.name, signing_key=forger, path_length=0
    )
    leaf = _leaf(world, issuer=inter.subject, signing_key=key)
    return Scenario(leaf, [inter])


def _look_alike_root(world: World) -> Scenario:
    # A root with the genuine root's name but another key, trusted in its place.
    impostor = raw_ca("Test Root", p256())
    return Scenario(world.leaf, roots=[impostor])


def _self_signed_leaf(world: World) -> Scenario:
    key = world.leaf_key
    leaf = _leaf(world, issuer=name("site/a"), signing_key=key)
    return Scenario(leaf)


def _leaf_signed_by_leaf(world: World) -> Scenario:
    # world.leaf's key (a non-CA) signs another leaf naming world.leaf as issuer.
    child = _leaf(
        world,
        subject=name("site/b"),
        issuer=world.leaf.subject,
        signing_key=world.leaf_key,
        public_key=p256().public_key(),
    )
    return Scenario(child, [world.leaf])


def _path_length_exceeded(world: World) -> Scenario:
    # The intermediate has pathLen 0, yet signs another intermediate.
    key = p256()
    sub = raw_ca(
        "Sub Intermediate", key, issuer=world.inter.name, signing_key=world.inter_key, path_length=0
    )
    leaf = _leaf(world, issuer=sub.subject, signing_key=key)
    return Scenario(leaf, [sub, world.inter.certificate])


def _intermediate_variant(
    world: World, *, ca: bool | None = True, usage: x509.KeyUsage | str | None = "default"
) -> Scenario:
    key = p256()
    inter = raw_ca(
        "Odd Intermediate",
        key,
        issuer=world.root.name,
        signing_key=world.root_key,
        ca=ca,
        usage=usage,
    )
    leaf = _leaf(world, issuer=inter.subject, signing_key=key)
    return Scenario(leaf, [inter])


def _ed25519_root(world: World) -> Scenario:
    key = ed25519.Ed25519PrivateKey.generate()
    root = raw_ca("Ed Root", key)
    leaf = _leaf(world, issuer=root.subject, signing_key=key)
    return Scenario(leaf, roots=[root])


def _tampered_signature(world: World) -> Scenario:
    return Scenario(load_certificate(flip_last_byte(certificate_der(world.leaf))))


def _rsa_leaf(world: World) -> Scenario:
    leaf = world.root.issue_identity(
        SITE_A,
        world.rsa_2048.public_key(),
        NOW - DAY,
        DAY * 2,
        serial_number="R",
        key_policy=KEY_POLICY_WITH_RSA,
    )
    return Scenario(leaf)


def _server_and_client(world: World) -> Scenario:
    leaf = world.root.issue_identity(
        SITE_A, world.leaf_key.public_key(), NOW - DAY, 2 * DAY, serial_number="S", server_auth=True
    )
    return Scenario(leaf)


def _crl_wrong_key(world: World) -> Scenario:
    forger = CertificateAuthority(raw_ca("Test Root", key := p256()), key)
    return Scenario(world.leaf, crls=[_crl(forger)])


def _crl_critical_extension(world: World) -> Scenario:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(world.root.name)
        .last_update(NOW - DAY)
        .next_update(NOW + DAY)
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(x509.DeltaCRLIndicator(0), critical=True)
        .sign(world.root_key, hashes.SHA256())
    )
    return Scenario(world.leaf, crls=[crl])


def _valid_and_forged_crl(world: World) -> Scenario:
    # An attacker adds a forged (empty) CRL beside the genuine one: still checked, still refused.
    forger = CertificateAuthority(raw_ca("Test Root", key := p256()), key)
    return Scenario(world.leaf, crls=[_crl(world.root), _crl(forger)])


CASES = [
    # -- accepted ---------------------------------------------------------------
    Case("root-leaf-p256", lambda w: Scenario(w.leaf, chain_length=2)),
    Case("root-leaf-ed25519", lambda w: Scenario(w.leaf_ed, chain_length=2)),
    Case("root-leaf-rsa2048", _rsa_leaf),
    Case(
        "root-intermediate-leaf",
        lambda w: Scenario(w.leaf_via_inter, [w.inter.certificate], chain_length=3),
    ),
    Case(
        "unrelated-intermediates-ignored",
        lambda w: Scenario(
            w.leaf_via_inter,
            [w.other_root.certificate, w.leaf, w.inter.certificate],
            chain_length=3,
        ),
    ),
    Case(
        "several-trust-roots",
        lambda w: Scenario(w.leaf, roots=[w.other_root.certificate, w.root.certificate]),
    ),
    Case("client-and-server-auth", _server_and_client),
    Case("at-not-before", lambda w: Scenario(w.leaf, now=w.leaf.not_valid_before_utc)),
    Case("at-not-after", lambda w: Scenario(w.leaf, now=w.leaf.not_valid_after_utc)),
    Case("max-depth-0-direct", lambda w: Scenario(w.leaf, max_depth=0)),
    Case(
        "max-depth-1-one-intermediate",
        lambda w: Scenario(w.leaf_via_inter, [w.inter.certificate], max_depth=1),
    ),
    Case("two-intermediates-within-depth", lambda w: _unlimited_root_chain(w, 2)),
    Case(
        "no-eku-when-not-required",
        lambda w: Scenario(_leaf(w, eku=None), require_client_auth=False),
    ),
    Case("crl-not-listing-leaf", lambda w: Scenario(w.leaf, crls=[_crl(w.root, [w.leaf_ed])])),
    Case(
        "crls-at-both-levels",
        lambda w: Scenario(
            w.leaf_via_inter, [w.inter.certificate], crls=[_crl(w.root), _crl(w.inter)]
        ),
    ),
    # -- outside a validity window ---------------------------------------------------
    Case(
        "leaf-expired",
        lambda w: Scenario(w.leaf, now=w.leaf.not_valid_after_utc + SECOND),
        CertificateExpired,
    ),
    Case(
        "leaf-not-yet-valid",
        lambda w: Scenario(w.leaf, now=w.leaf.not_valid_before_utc - SECOND),
        CertificateExpired,
    ),
    Case("leaf-long-expired", lambda w: Scenario(w.leaf, now=NOW + 400 * DAY), CertificateExpired),
    Case("intermediate-expired", _expired_intermediate, CertificateExpired),
    Case("intermediate-not-yet-valid", _future_intermediate, CertificateExpired),
    Case("root-expired", _expired_root, CertificateExpired),
    # -- not trusted ------------------------------------------------------------
    Case("forged-leaf-same-issuer-name", _forged_leaf, CertificateInvalid),
    Case("forged-intermediate", _forged_intermediate, CertificateInvalid),
    Case("look-alike-root", _look_alike_root, CertificateInvalid),
    Case(
        "unknown-issuer",
        lambda w: Scenario(w.leaf, roots=[w.other_root.certificate]),
        CertificateInvalid,
    ),
    Case("missing-intermediate", lambda w: Scenario(w.leaf_via_inter), CertificateInvalid),
    Case("tampered-signature", _tampered_signature, CertificateInvalid),
    Case("self-signed-leaf", _self_signed_leaf, CertificateInvalid),
    Case("leaf-signed-by-leaf", _leaf_signed_by_leaf, CertificateInvalid),
    Case("ed25519-root-refused-by-validator", _ed25519_root, CertificateInvalid),
    # -- wrong shape or usage ---------------------------------------------------
    Case("intermediate-as-leaf", lambda w: Scenario(w.inter.certificate), CertificateInvalid),
    Case("root-as-leaf", lambda w: Scenario(w.root.certificate), CertificateInvalid),
    Case(
        "leaf-server-auth-only", lambda w: Scenario(_leaf(w, eku=[SERVER_AUTH])), CertificateInvalid
    ),
    Case("leaf-without-eku", lambda w: Scenario(_leaf(w, eku=None)), CertificateInvalid),
    Case(
        "leaf-server-auth-only-even-if-eku-optional",
        lambda w: Scenario(_leaf(w, eku=[SERVER_AUTH]), require_client_auth=False),
        CertificateInvalid,
    ),
    Case("leaf-without-san", lambda w: Scenario(_leaf(w, sans=None)), CertificateInvalid),
    Case(
        "leaf-with-key-cert-sign",
        lambda w: Scenario(_leaf(w, usage=key_usage(ca=True))),
        CertificateInvalid,
    ),
    Case(
        "leaf-unknown-critical-extension",
        lambda w: Scenario(
            _leaf(
                w,
                extra=[
                    (
                        x509.UnrecognizedExtension(
                            x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"
                        ),
                        True,
                    )
                ],
            )
        ),
        CertificateInvalid,
    ),
    Case(
        "chain-deeper-than-max-depth",
        lambda w: Scenario(w.leaf_via_inter, [w.inter.certificate], max_depth=0),
        CertificateInvalid,
    ),
    Case(
        "three-intermediates-default-depth",
        lambda w: _unlimited_root_chain(w, 3),
        CertificateInvalid,
    ),
    Case("intermediate-path-length-exceeded", _path_length_exceeded, CertificateInvalid),
    Case(
        "intermediate-without-key-cert-sign",
        lambda w: _intermediate_variant(w, usage=key_usage(ca=False)),
        CertificateInvalid,
    ),
    Case(
        "intermediate-without-key-usage",
        lambda w: _intermediate_variant(w, usage=None),
        CertificateInvalid,
    ),
    Case(
        "intermediate-without-basic-constraints",
        lambda w: _intermediate_variant(w, ca=None),
        CertificateInvalid,
    ),
    Case("intermediate-not-a-ca", lambda w: _intermediate_variant(w, ca=False), CertificateInvalid),
    # -- revocation --------------------------------------------------------------
    Case(
        "leaf-revoked",
        lambda w: Scenario(w.leaf, crls=[_crl(w.root, [w.leaf])]),
        CertificateRevoked,
    ),
    Case(
        "intermediate-revoked",
        lambda w: Scenario(
            w.leaf_via_inter,
            [w.inter.certificate],
            crls=[_crl(w.root, [w.inter.certificate]), _crl(w.inter)],
        ),
        CertificateRevoked,
    ),
    Case(
        "crl-stale",
        lambda w: Scenario(w.leaf, crls=[_crl(w.root, next_update=NOW - SECOND)]),
        CertificateInvalid,
    ),
    Case(
        "crl-from-the-future",
        lambda w: Scenario(w.leaf, crls=[_crl(w.root, now=NOW + SECOND, next_update=NOW + DAY)]),
        CertificateInvalid,
    ),
    Case("crl-signed-by-wrong-key", _crl_wrong_key, CertificateInvalid),
    Case("crl-forged-beside-genuine", _valid_and_forged_crl, CertificateInvalid),
    Case("crl-missing", lambda w: Scenario(w.leaf, crls=[]), CertificateInvalid),
    Case(
        "crl-missing-for-intermediate",
        lambda w: Scenario(w.leaf_via_inter, [w.inter.certificate], crls=[_crl(w.root)]),
        CertificateInvalid,
    ),
    Case(
        "crl-other-issuer-only",
        lambda w: Scenario(w.leaf, crls=[_crl(w.other_root)]),
        CertificateInvalid,
    ),
    Case("crl-with-critical-extension", _crl_critical_extension, CertificateInvalid),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_path_validation(world: World, case: Case) -> None:
    s = case.build(world)
    roots = [world.root.certificate] if s.roots is None else s.roots

    def run() -> list[x509.Certificate]:
        return verify_chain(
            s.leaf,
            s.intermediates,
            roots,
            s.now,
            crls=s.crls,
            max_depth=s.max_depth,
            require_client_auth=s.require_client_auth,
        )

    if case.expect is None:
        chain = run()
        assert chain[0] == s.leaf
        assert chain[-1] in roots
        if s.chain_length is not None:
            assert len(chain) == s.chain_length
    else:
        with pytest.raises(case.expect) as info:
            run()
        # The precise type, not a sibling that happens to share the base class.
        assert type(info.value) is case.expect


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


def test_revoked_leaf_passes_only_when_revocation_is_off(world: World) -> None:
    crl = _crl(world.root, [world.leaf])
    roots = [world.root.certificate]
    verify_chain(world.leaf, [], roots, NOW)
    with pytest.raises(CertificateRevoked):
        verify_chain(world.leaf, [], roots, NOW, crls=[crl])


def test_crl_current_exactly_at_next_update(world: World) -> None:
    crl = _crl(world.root, next_update=NOW)
    verify_chain(world.leaf, [], [world.root.certificate], NOW, crls=[crl])


def test_no_trust_roots_is_a_configuration_error(world: World) -> None:
    with pytest.raises(ConfigurationError):
        verify_chain(world.leaf, [], [], NOW)


def test_end_entity_as_trust_root_is_a_configuration_error(world: World) -> None:
    # cryptography would accept a leaf found in the store as a chain of one.
    with pytest.raises(ConfigurationError):
        verify_chain(world.leaf, [], [world.leaf], NOW)


def test_naive_now_is_refused(world: World) -> None:
    with pytest.raises(LocalProtocolError):
        verify_chain(world.leaf, [], [world.root.certificate], NOW.replace(tzinfo=None))


def test_now_in_another_zone_means_the_same_instant(world: World) -> None:
    just_after = (world.leaf.not_valid_after_utc + SECOND).astimezone(timezone(timedelta(hours=-7)))
    with pytest.raises(CertificateExpired):
        verify_chain(world.leaf, [], [world.root.certificate], just_after)


def test_unused_client_auth_oid_constant_is_the_real_one() -> None:
    assert CLIENT_AUTH.dotted_string == "1.3.6.1.5.5.7.3.2"
