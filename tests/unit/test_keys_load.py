"""Loading a CA's private key: passphrase mistakes are said in the operator's words."""

from __future__ import annotations

import pytest

from iotdlm.errors import BadRequestError
from iotdlm.pki.keys import Algorithm, generate_key, load_private_key_pem, private_key_to_pem


def test_encrypted_key_without_a_passphrase() -> None:
    pem = private_key_to_pem(generate_key(Algorithm.P256), b"secret")
    with pytest.raises(BadRequestError, match="encrypted and no passphrase was given"):
        load_private_key_pem(pem, None)


def test_plain_key_with_a_passphrase() -> None:
    pem = private_key_to_pem(generate_key(Algorithm.P256), None)
    with pytest.raises(BadRequestError, match="not encrypted"):
        load_private_key_pem(pem, b"secret")


def test_wrong_passphrase() -> None:
    pem = private_key_to_pem(generate_key(Algorithm.P256), b"secret")
    with pytest.raises(BadRequestError, match="wrong passphrase"):
        load_private_key_pem(pem, b"other")
