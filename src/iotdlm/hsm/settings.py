"""The ``[hsm]`` settings of ``iotdlm.toml``: where a deployment's CA keys are in a PKCS#11 token.

``iotdlm init --ca-key 'pkcs11:token=T;object=P'`` makes one key per CA in token T, labelled
``P-root``, ``P-factory``, ``P-operational``, ``P-service``, and writes their URIs under
``[hsm] ca_keys``. Pure (no python-pkcs11 here: every command loads the configuration, only km
and init open the token, through :mod:`iotdlm.hsm.ca_keys`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import msgspec

from iotdlm.errors import BadRequestError
from iotdlm.hsm.uri import Pkcs11Uri, parse_pkcs11_uri

__all__ = ["HsmSettings", "settings_for_init"]

_DEFAULT_PREFIX = "iotdlm"


class HsmSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    #: the PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so (a key URI's module-path= wins)
    module_path: str | None = None
    #: a file (mode 0600) holding the token's user PIN; $IOTDLM_HSM_PIN wins over it
    pin_file: str | None = None
    #: the RFC 7512 PKCS#11 URI of each CA's key: root, factory, operational, service
    ca_keys: dict[str, str] = {}

    def validate(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self.ca_keys]
        if missing:
            raise BadRequestError(f"[hsm] ca_keys names no key for the CA(s) {', '.join(missing)}", field="hsm.ca_keys")
        for name, text in self.ca_keys.items():
            try:
                uri = parse_pkcs11_uri(text, allow_pin_value=True)
            except BadRequestError as exc:
                raise BadRequestError(f"[hsm] ca_keys.{name}: {exc.message}", field=f"hsm.ca_keys.{name}") from exc
            if uri.object is None and uri.id is None:
                raise BadRequestError(f"[hsm] ca_keys.{name} names no key: add object=", field=f"hsm.ca_keys.{name}")
        if self.pin_file is not None and not os.path.isabs(self.pin_file):
            raise BadRequestError("[hsm] pin_file must be an absolute path", field="hsm.pin_file")


def settings_for_init(
    ca_key: str, names: Sequence[str], *, module_path: str | None, pin_file: str | None
) -> HsmSettings:
    """The ``[hsm]`` settings for a new deployment whose CA keys go into the token ``ca_key`` names
    (a URI from the command line: ``pin-value=`` refused); ``object=`` is the labels' prefix."""
    base = parse_pkcs11_uri(ca_key)
    if base.id is not None:
        raise BadRequestError("--ca-key: leave id= out; init gives each CA key its own label from object=")
    if base.module_path is None and module_path is None:
        raise BadRequestError("--ca-key: name the PKCS#11 library with --hsm-module or module-path= in the URI")
    prefix = base.object or _DEFAULT_PREFIX
    keys = {
        name: Pkcs11Uri(
            token=base.token,
            manufacturer=base.manufacturer,
            serial=base.serial,
            model=base.model,
            object=f"{prefix}-{name}",
            module_path=base.module_path,
            pin_source=base.pin_source,
        ).to_string()
        for name in names
    }
    return HsmSettings(module_path=module_path, pin_file=pin_file, ca_keys=keys)
