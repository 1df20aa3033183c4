"""RFC 7512 PKCS#11 URIs (hsm/uri.py): what is taken, what is refused and how it is worded, and
Hypothesis: any text either parses or is a BadRequestError, and a parsed URI written out parses to
the same thing."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError, NotFoundError
from iotdlm.hsm.token import PIN_ENV, read_pin
from iotdlm.hsm.uri import Pkcs11Uri, parse_pkcs11_uri

GOOD = [
    ("pkcs11:token=iotdlm;object=site-root", Pkcs11Uri(token="iotdlm", object="site-root")),
    ("PKCS11:token=a", Pkcs11Uri(token="a")),
    ("pkcs11:token=My%20HSM;object=ca%2Fone;type=private", Pkcs11Uri(token="My HSM", object="ca/one")),
    ("pkcs11:serial=DECC0401648;id=%01%02%ff", Pkcs11Uri(serial="DECC0401648", id=b"\x01\x02\xff")),
    (
        "pkcs11:token=t;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;object=k"
        "?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/iotdlm/pin",
        Pkcs11Uri(
            token="t",
            manufacturer="SoftHSM project",
            model="SoftHSM v2",
            object="k",
            module_path="/usr/lib/softhsm/libsofthsm2.so",
            pin_source="file:/etc/iotdlm/pin",
        ),
    ),
]

BAD = [
    ("token=a", "must start with pkcs11:"),
    ("https://example.test", "must start with pkcs11:"),
    ("pkcs11:", "name the token with token="),
    ("pkcs11:object=k", "name the token with token="),
    ("pkcs11:token=a;token=b", "token appears twice"),
    ("pkcs11:token=a;colour=red", "unknown attribute 'colour' in the path"),
    ("pkcs11:token=a?object=k", "unknown attribute 'object' in the query"),
    ("pkcs11:token=a;x-vendor=1", "unknown attribute 'x-vendor'"),
    ("pkcs11:token=a;slot-id=3", "slot-id is not supported here"),
    ("pkcs11:token=a?module-name=softhsm2", "module-name is not supported here; give the library's full path"),
    ("pkcs11:token=a;object", "'object' is not name=value"),
    ("pkcs11:token=a;=x", "is not name=value"),
    ("pkcs11:token=a b", "must be percent-encoded"),
    ("pkcs11:token=a/b", "must be percent-encoded"),
    ("pkcs11:token=a%zz", "must be percent-encoded"),
    ("pkcs11:token=%ff%fe", "not UTF-8"),
    ("pkcs11:token=a%00", "control characters"),
    ("pkcs11:token=", "empty"),
    ("pkcs11:token=a;type=cert", "type=cert does not name a CA key"),
    ("pkcs11:token=a;id=", "id is empty"),
    ("pkcs11:token=a?pin-value=1234", "no pin-value= here"),
    ("pkcs11:token=a" + "b" * 5000, "longer than 4096"),
]


@pytest.mark.parametrize(("text", "expected"), GOOD, ids=[g[0][:40] for g in GOOD])
def test_good(text: str, expected: Pkcs11Uri) -> None:
    assert parse_pkcs11_uri(text) == expected


@pytest.mark.parametrize(("text", "words"), BAD, ids=[b[0][:40] for b in BAD])
def test_refused_in_words(text: str, words: str) -> None:
    with pytest.raises(BadRequestError, match=r"PKCS#11 URI") as info:
        parse_pkcs11_uri(text)
    assert words in info.value.message


def test_pin_value_only_where_allowed() -> None:
    assert parse_pkcs11_uri("pkcs11:token=a?pin-value=1234", allow_pin_value=True).pin_value == "1234"
    with pytest.raises(BadRequestError, match="not both"):
        parse_pkcs11_uri("pkcs11:token=a?pin-value=1&pin-source=/p", allow_pin_value=True)


def test_written_out_without_the_pin() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=a?pin-value=1234&module-path=/lib/p.so", allow_pin_value=True)
    assert "1234" not in uri.to_string()
    assert parse_pkcs11_uri(uri.to_string()).module_path == "/lib/p.so"


_URI_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))


@given(st.text(alphabet=_URI_CHARS, max_size=200))
def test_any_text_parses_or_is_refused(text: str) -> None:
    for candidate in (text, "pkcs11:" + text, "pkcs11:token=t;" + text):
        try:
            uri = parse_pkcs11_uri(candidate)
        except BadRequestError as exc:
            refusal = exc.message
            assert "PKCS#11 URI" in refusal
        else:
            assert uri.token is not None or uri.serial is not None


_VALUE = st.text(alphabet=_URI_CHARS.filter(lambda c: ord(c) >= 32 and ord(c) != 127), min_size=1, max_size=40)


@given(
    token=_VALUE,
    obj=st.none() | _VALUE,
    key_id=st.none() | st.binary(min_size=1, max_size=20),
    module=st.none() | _VALUE,
    pin_source=st.none() | _VALUE,
)
def test_written_out_parses_back(
    token: str, obj: str | None, key_id: bytes | None, module: str | None, pin_source: str | None
) -> None:
    uri = Pkcs11Uri(token=token, object=obj, id=key_id, module_path=module, pin_source=pin_source)
    assert parse_pkcs11_uri(uri.to_string()) == uri


# --- the PIN: never from the command line -----------------------------------------------------------


def test_pin_from_env_then_uri_file_then_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri_file, config_file = tmp_path / "uri-pin", tmp_path / "config-pin"
    uri_file.write_text("1111\n")
    config_file.write_text("2222\n")
    uri = parse_pkcs11_uri(f"pkcs11:token=t?pin-source=file:{uri_file}")
    monkeypatch.setenv(PIN_ENV, "0000")
    assert read_pin(uri, str(config_file)) == "0000"
    monkeypatch.delenv(PIN_ENV)
    assert read_pin(uri, str(config_file)) == "1111"
    assert read_pin(parse_pkcs11_uri("pkcs11:token=t"), str(config_file)) == "2222"
    with pytest.raises(NotFoundError, match=f"no HSM PIN: set \\${PIN_ENV}, or put the PIN in a file"):
        read_pin(parse_pkcs11_uri("pkcs11:token=t"), None)


@pytest.mark.parametrize(("content", "words"), [(b"", "is empty"), (b"x" * 300, "longer than 256")])
def test_a_bad_pin_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, words: str) -> None:
    monkeypatch.delenv(PIN_ENV, raising=False)
    pin = tmp_path / "pin"
    pin.write_bytes(content)
    with pytest.raises(BadRequestError, match=words):
        read_pin(parse_pkcs11_uri("pkcs11:token=t"), str(pin))


def test_a_missing_pin_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PIN_ENV, raising=False)
    with pytest.raises(NotFoundError, match=r"cannot read the HSM PIN file .*nope"):
        read_pin(parse_pkcs11_uri("pkcs11:token=t"), str(tmp_path / "nope"))
