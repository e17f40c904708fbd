from __future__ import annotations

import pytest

from keybroker.errors import DecodeError
from keybroker.pki import PrincipalId, PrincipalKind


@pytest.mark.parametrize(
    ("text", "kind", "name"),
    [
        ("site/fra1", PrincipalKind.SITE, "fra1"),
        ("node/n-1.a_b", PrincipalKind.NODE, "n-1.a_b"),
        ("device/0", PrincipalKind.DEVICE, "0"),
        ("service/key-server", PrincipalKind.SERVICE, "key-server"),
        ("user/alice", PrincipalKind.USER, "alice"),
        ("user/" + "a" * 59, PrincipalKind.USER, "a" * 59),  # exactly 64 characters in all
    ],
)
def test_parse_valid(text: str, kind: PrincipalKind, name: str) -> None:
    principal = PrincipalId.parse(text)
    assert (principal.kind, principal.name) == (kind, name)
    assert str(principal) == text
    assert principal.uri == f"keybroker://{text}"
    assert PrincipalId.from_uri(principal.uri) == principal


@pytest.mark.parametrize(
    "text",
    [
        "",
        "site",
        "site/",
        "/fra1",
        "Site/fra1",
        "SITE/fra1",
        "robot/fra1",
        "site/Fra1",
        "site/-fra1",
        "site/.fra1",
        "site/_fra1",
        "site/fra 1",
        "site/fra1/x",
        "site/fra1\n",
        "site/frä1",
        "site/" + "a" * 64,  # over the name grammar's 63
        "service/" + "a" * 57,  # grammar allows it, but 65 characters do not fit a CN
        " site/fra1",
    ],
)
def test_parse_invalid(text: str) -> None:
    with pytest.raises(DecodeError):
        PrincipalId.parse(text)


@pytest.mark.parametrize(
    "uri",
    [
        "KEYBROKER://site/a",
        "keybroker:/site/a",
        "keybroker://site/A",
        "https://site/a",
        "keybroker://",
    ],
)
def test_from_uri_invalid(uri: str) -> None:
    with pytest.raises(DecodeError):
        PrincipalId.from_uri(uri)


def test_constructor_validates_and_accepts_plain_kind_string() -> None:
    assert PrincipalId("site", "a") == PrincipalId(PrincipalKind.SITE, "a")  # type: ignore[arg-type]
    assert isinstance(PrincipalId("site", "a").kind, PrincipalKind)  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        PrincipalId("robot", "a")  # type: ignore[arg-type]
    with pytest.raises(DecodeError):
        PrincipalId(PrincipalKind.SITE, "A")
    with pytest.raises(DecodeError):
        PrincipalId(1, "a")  # type: ignore[arg-type]


def test_value_semantics() -> None:
    assert PrincipalId.parse("site/a") == PrincipalId.parse("site/a")
    assert PrincipalId.parse("site/a") != PrincipalId.parse("node/a")
    assert len({PrincipalId.parse("site/a"), PrincipalId.parse("site/a")}) == 1
    with pytest.raises(AttributeError):
        PrincipalId.parse("site/a").name = "b"  # type: ignore[misc]
