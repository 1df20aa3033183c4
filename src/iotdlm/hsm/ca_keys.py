"""A deployment's CA keys in a token: the key ring.

A :class:`CaKeyRing` opens each token once (one logged-in session per token and process, reused by
every signer of its keys) and hands out :class:`~iotdlm.hsm.signer.Pkcs11Signer` for the URIs of
``[hsm] ca_keys`` (:mod:`iotdlm.hsm.settings`). Imported only where a CA key is used: it loads
python-pkcs11.
"""

from __future__ import annotations

import os
import threading

from iotdlm.errors import BadRequestError
from iotdlm.hsm.settings import HsmSettings
from iotdlm.hsm.signer import Pkcs11Signer
from iotdlm.hsm.token import Token, open_token, read_pin
from iotdlm.hsm.uri import Pkcs11Uri, parse_pkcs11_uri
from iotdlm.pki.keys import Algorithm

__all__ = ["CaKeyRing"]


class CaKeyRing:
    """The CA keys of one deployment in one process: tokens opened on first use, then reused."""

    def __init__(self, settings: HsmSettings) -> None:
        self.settings = settings
        self._tokens: dict[tuple[str | None, str | None, str | None], Token] = {}
        self._lock = threading.Lock()

    def _token(self, uri: Pkcs11Uri) -> Token:
        module = uri.module_path or self.settings.module_path
        ident = (module, uri.token, uri.serial)
        with self._lock:
            token = self._tokens.get(ident)
            if token is None:
                pin = read_pin(uri, self.settings.pin_file)
                token = open_token(uri, module_path=module, pin=pin)
                self._tokens[ident] = token
            return token

    def _uri(self, name: str) -> Pkcs11Uri:
        text = self.settings.ca_keys.get(name)
        if text is None:
            raise BadRequestError(f"[hsm] ca_keys names no key for the {name} CA")
        return parse_pkcs11_uri(text, allow_pin_value=True)

    def signer(self, name: str) -> Pkcs11Signer:
        """The signer of CA ``name``'s key (NotFoundError, BadRequestError in words if it cannot be had)."""
        uri = self._uri(name)
        return Pkcs11Signer(self._token(uri), uri)

    def generate(self, name: str, alg: Algorithm) -> Pkcs11Signer:
        """Make CA ``name``'s key in its token (refused if its label is taken), and its signer."""
        uri = self._uri(name)
        assert uri.object is not None
        self._token(uri).generate(alg, uri.object, os.urandom(16))
        return Pkcs11Signer(self._token(uri), uri)

    def close(self) -> None:
        with self._lock:
            for token in self._tokens.values():
                token.close()
            self._tokens.clear()
