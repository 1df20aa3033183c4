"""A PKCS#11 token over python-pkcs11: open it with the user PIN, generate CA keys in it, find them.

One :class:`Token` is one logged-in read-write session, shared by the signers of its keys (a km
worker opens its token once, at start) and serialised by a lock: a PKCS#11 session runs one
operation at a time. Keys are made in the token, sensitive and not extractable, and a key found
extractable is refused: a CA key in an HSM is only worth having if it cannot leave it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pkcs11
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.util.ec import encode_named_curve_parameters

from iotdlm.errors import BadRequestError, ConflictError, NotFoundError, UnavailableError
from iotdlm.hsm.uri import PIN_ENV_NAME, Pkcs11Uri
from iotdlm.pki.keys import Algorithm

__all__ = ["PIN_ENV", "KeyPair", "Token", "open_token", "read_pin"]

#: the user PIN of the token, when not in a file
PIN_ENV: Final = PIN_ENV_NAME
_CURVES: Final = {Algorithm.P256: "secp256r1", Algorithm.P384: "secp384r1"}
_MAX_PIN_BYTES: Final = 256


def read_pin(uri: Pkcs11Uri, pin_file: str | None) -> str:
    """The user PIN: ``$IOTDLM_HSM_PIN``, else the URI's ``pin-source`` file, else ``pin_file``
    (the configuration's), else the URI's ``pin-value``. NotFoundError saying how when none is set."""
    env = os.environ.get(PIN_ENV)
    if env:
        return env
    source = uri.pin_source or pin_file
    if source is not None:
        path = Path(source.removeprefix("file://").removeprefix("file:"))
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise NotFoundError(f"cannot read the HSM PIN file {path}: {exc.strerror or exc}") from exc
        pin = data.strip()
        if not pin or len(pin) > _MAX_PIN_BYTES:
            raise BadRequestError(f"the HSM PIN file {path} is empty or longer than {_MAX_PIN_BYTES} bytes")
        return pin.decode("utf-8", errors="strict")
    if uri.pin_value is not None:
        return uri.pin_value
    raise NotFoundError(
        f"no HSM PIN: set ${PIN_ENV}, or put the PIN in a file (mode 0600) and name it with pin_file in "
        "[hsm] of iotdlm.toml or pin-source= in the key's PKCS#11 URI"
    )


@dataclass(frozen=True)
class KeyPair:
    """A private key in the token and its public half (python-pkcs11 objects)."""

    private: pkcs11.SignMixin
    public: pkcs11.PublicKey


class Token:
    """One logged-in session on one token; every operation holds :attr:`lock`."""

    def __init__(self, session: pkcs11.Session, description: str) -> None:
        self._session = session
        self.description = description
        self.lock = threading.Lock()

    def find(self, uri: Pkcs11Uri) -> KeyPair:
        """The key pair the URI's object= / id= names; NotFoundError or ConflictError in words."""
        if uri.object is None and uri.id is None:
            raise BadRequestError("the PKCS#11 URI names no key: add object=LABEL (or id=)")
        what = f"object={uri.object}" if uri.object is not None else "that id"
        with self.lock:
            try:
                private = self._session.get_key(ObjectClass.PRIVATE_KEY, label=uri.object, id=uri.id)
                public = self._session.get_key(ObjectClass.PUBLIC_KEY, label=uri.object, id=uri.id)
            except p11.NoSuchKey as exc:
                raise NotFoundError(
                    f"no private key with its public key for {what} in {self.description}; "
                    "`iotdlm init --ca-key` makes them"
                ) from exc
            except p11.MultipleObjectsReturned as exc:
                raise ConflictError(f"several keys match {what} in {self.description}; add id= to the URI") from exc
            if private[Attribute.EXTRACTABLE] or not private[Attribute.SENSITIVE]:
                raise BadRequestError(
                    f"the key {what} in {self.description} can be exported (CKA_EXTRACTABLE true or CKA_SENSITIVE "
                    "false): a CA key must never leave the HSM; make a new one with `iotdlm init --ca-key`"
                )
        assert isinstance(private, pkcs11.SignMixin)
        assert isinstance(public, pkcs11.PublicKey)
        return KeyPair(private=private, public=public)

    def generate(self, alg: Algorithm, label: str, key_id: bytes) -> None:
        """A new key pair of ``alg`` labelled ``label``, made in the token: sensitive, never extractable."""
        private_template = {
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.SIGN: True,
            Attribute.ID: key_id,
        }
        public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True, Attribute.ID: key_id}
        with self.lock:
            if list(self._session.get_objects({Attribute.LABEL: label})):
                raise ConflictError(
                    f"{self.description} already holds an object labelled {label!r}; choose another object="
                )
            try:
                if alg is Algorithm.RSA3072:
                    self._session.generate_keypair(
                        KeyType.RSA, 3072, store=True, label=label,
                        public_template=public_template, private_template=private_template,
                    )  # fmt: skip
                    return
                curve = _CURVES.get(alg)
                if curve is None:
                    raise BadRequestError(
                        f"no CA keys of {alg.value} in an HSM: use ecdsa-p256, ecdsa-p384 or rsa-3072"
                    )
                params = self._session.create_domain_parameters(
                    KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
                )
                params.generate_keypair(
                    store=True, label=label, public_template=public_template, private_template=private_template
                )
            except p11.PKCS11Error as exc:
                raise UnavailableError(
                    f"{self.description} did not make the {alg.value} key {label!r}: {exc!r}"
                ) from exc

    def close(self) -> None:
        with self.lock:
            self._session.close()


def open_token(uri: Pkcs11Uri, *, module_path: str | None, pin: str) -> Token:
    """Log in to the token the URI names, through the PKCS#11 library ``module-path=`` (or ``module_path``)."""
    path = uri.module_path or module_path
    if path is None:
        raise BadRequestError(
            "no PKCS#11 library: set module_path in [hsm] of iotdlm.toml or add module-path= to the URI"
        )
    try:
        lib = pkcs11.lib(path)
    except (RuntimeError, OSError, p11.PKCS11Error) as exc:
        raise NotFoundError(f"cannot load the PKCS#11 library {path}: {exc}") from exc
    name = f"token={uri.token}" if uri.token is not None else f"serial={uri.serial}"
    try:
        tokens = [
            t
            for t in lib.get_tokens(
                token_label=uri.token, token_serial=None if uri.serial is None else uri.serial.encode()
            )
            if (uri.manufacturer is None or t.manufacturer_id == uri.manufacturer)
            and (uri.model is None or t.model == uri.model)
        ]
    except p11.PKCS11Error as exc:
        raise UnavailableError(f"the PKCS#11 library {path} cannot list its tokens: {exc!r}") from exc
    if len(tokens) != 1:
        found = "no token" if not tokens else f"{len(tokens)} tokens"
        raise NotFoundError(
            f"{found} with {name} in {path}; `softhsm2-util --show-slots` (or your HSM's tool) lists them"
        )
    description = f"the HSM token {tokens[0].label!r}"
    try:
        try:
            session = tokens[0].open(rw=True, user_pin=pin)
        except p11.UserAlreadyLoggedIn:
            # PKCS#11 logs in the application, not the session: another session of this process
            # on the token already did (a second Deployment object, a test)
            session = tokens[0].open(rw=True)
    except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange) as exc:
        raise BadRequestError(f"the HSM PIN does not open {description}: check ${PIN_ENV} or the PIN file") from exc
    except p11.PinLocked as exc:
        raise BadRequestError(f"{description} is locked after wrong PINs: its security officer must unlock it") from exc
    except p11.PKCS11Error as exc:
        raise UnavailableError(f"cannot open a session on {description}: {exc!r}") from exc
    return Token(session, description)
