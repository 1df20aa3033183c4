"""The OCSP GET path's fast unquoting (iotdlm.pki.ocsp._unquote_base64) is urllib's, always."""

from __future__ import annotations

import base64
import os
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotdlm.errors import BadRequestError
from iotdlm.pki.ocsp import _unquote_base64, decode_get_path

# what a GET path is made of, hostile bits included: escapes of every case, broken escapes, non-ASCII
_PIECES = st.sampled_from(
    ["%2F", "%2f", "%2B", "%2b", "%3D", "%3d", "%25", "%", "%%", "%2", "%41", "%e9", "%C3%A9", "%zz", "é", "+", " "]
)
_TEXT = st.lists(st.one_of(_PIECES, st.text("ABCXYZabcxyz0123456789/+=%", max_size=4)), max_size=12).map("".join)


def _reference(text: str) -> str | None:
    try:
        return urllib.parse.unquote(text, encoding="ascii", errors="strict")
    except UnicodeDecodeError:
        return None


@settings(max_examples=400, deadline=None)
@given(text=_TEXT)
def test_fast_unquote_is_urllib_unquote(text: str) -> None:
    want = _reference(text)
    if want is None:
        with pytest.raises(BadRequestError):
            _unquote_base64(text)
    else:
        assert _unquote_base64(text) == want


@pytest.mark.parametrize("safe", ["", "/", "/+="])
def test_every_spelling_of_a_request_decodes_to_its_der(safe: str) -> None:
    der = b"\x30" + os.urandom(86)  # a DER request starts with SEQUENCE: its base64 with 'M', never '/'
    path = urllib.parse.quote(base64.b64encode(der).decode(), safe=safe)
    assert decode_get_path(path) == der
    assert decode_get_path(path.replace("%2F", "%2f").replace("%2B", "%2b")) == der
