"""Certificate profiles as the operator configures them in ``iotdlm.toml`` (``[profiles.<name>]``).

Pure: the settings come in as values, a :class:`~iotdlm.pki.profiles.Profile` comes out, or a
:class:`~iotdlm.errors.BadRequestError` naming the setting. The built-in profiles are the
defaults; a setting narrows or adjusts one of them and never grants what the RA denies by default:

- key usage: ``digitalSignature`` (always; every profile signs), ``keyEncipherment``,
  ``keyAgreement`` (each made to fit the key type at issuance, :func:`~iotdlm.pki.profiles.key_usage_for`).
  ``keyCertSign`` and ``cRLSign`` are refused: only the CAs iotdlm creates sign certificates and CRLs
  (and end-entity certificates carry ``CA:false``, which is not configurable).
- extended key usage: ``clientAuth`` (devices and modules authenticate with it: factory,
  operational and service keep it), ``serverAuth`` (tls-server's own; any other profile only with
  ``allow_server_auth = true``), ``OCSPSigning`` (the ocsp profile's alone, and all it carries).
  ``anyExtendedKeyUsage`` and other purposes are refused.
- name rule: ``device_id_pattern``, a regular expression every device id of the profile must match
  in full; the RA refuses other ids whatever rule would grant them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from iotdlm.errors import BadRequestError
from iotdlm.pki.profiles import KeyUsageSpec, Profile

#: key usage names as RFC 5280 spells them -> the KeyUsageSpec field
KEY_USAGES = {
    "digitalSignature": "digital_signature",
    "keyEncipherment": "key_encipherment",
    "keyAgreement": "key_agreement",
}
#: refused with the reason
KEY_USAGES_DENIED = {
    "keyCertSign": "only iotdlm's CAs sign certificates; a profile cannot make a CA",
    "cRLSign": "only iotdlm's CAs sign CRLs",
    "nonRepudiation": "not offered: iotdlm's certificates authenticate, they do not sign documents",
    "contentCommitment": "not offered: iotdlm's certificates authenticate, they do not sign documents",
    "dataEncipherment": "not offered (RFC 5280 4.2.1.3: keys are agreed or transported, not used directly)",
    "encipherOnly": "not offered",
    "decipherOnly": "not offered",
}
EXTENDED_KEY_USAGES = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
}
#: profiles whose holders authenticate as TLS clients (devices to cm, modules to NATS and km)
CLIENT_PROFILES = ("factory", "operational", "service")
MAX_VALIDITY_DAYS = 36500
MAX_PATTERN_LENGTH = 200


def _bad(name: str, key: str, message: str) -> BadRequestError:
    return BadRequestError(f"profiles.{name}.{key}: {message}", field=f"profiles.{name}.{key}")


def key_usage(name: str, values: list[str]) -> KeyUsageSpec:
    """The key usage of profile ``name`` from its RFC 5280 names."""
    flags: dict[str, bool] = {}
    for value in values:
        if value in KEY_USAGES_DENIED:
            raise _bad(name, "key_usage", f"{value} is refused: {KEY_USAGES_DENIED[value]}")
        if value not in KEY_USAGES:
            raise _bad(name, "key_usage", f"unknown key usage {value!r}; use {', '.join(KEY_USAGES)}")
        flags[KEY_USAGES[value]] = True
    if not flags.get("digital_signature"):
        raise _bad(name, "key_usage", "must include digitalSignature: every iotdlm certificate's key signs")
    return KeyUsageSpec(**flags)


def extended_key_usage(name: str, values: list[str], *, allow_server_auth: bool) -> tuple[ObjectIdentifier, ...]:
    """The extended key usages of profile ``name`` from their names, within what the RA allows."""
    unknown = [v for v in values if v not in EXTENDED_KEY_USAGES]
    if unknown:
        raise _bad(name, "extended_key_usage", f"{unknown[0]!r} is not offered; use {', '.join(EXTENDED_KEY_USAGES)}")
    if not values or len(set(values)) != len(values):
        raise _bad(name, "extended_key_usage", "list each extended key usage once, at least one")
    if name == "ocsp" and values != ["OCSPSigning"]:
        raise _bad(name, "extended_key_usage", "the OCSP responder's certificate carries OCSPSigning alone")
    if name != "ocsp" and "OCSPSigning" in values:
        raise _bad(name, "extended_key_usage", "OCSPSigning belongs to the ocsp profile alone")
    if name in CLIENT_PROFILES and "clientAuth" not in values:
        raise _bad(name, "extended_key_usage", f"{name} certificates authenticate TLS clients: keep clientAuth")
    if name == "tls-server" and values != ["serverAuth"]:
        raise _bad(name, "extended_key_usage", "tls-server certificates carry serverAuth alone")
    if name != "tls-server" and "serverAuth" in values and not allow_server_auth:
        raise _bad(
            name,
            "extended_key_usage",
            "serverAuth lets the holder act as a TLS server for the names it carries; "
            "set allow_server_auth = true in this profile if that is intended",
        )
    return tuple(EXTENDED_KEY_USAGES[v] for v in values)


def device_id_rule(name: str, pattern: str) -> re.Pattern[str]:
    """The compiled name rule of profile ``name``: device ids must match it in full."""
    if not pattern or len(pattern) > MAX_PATTERN_LENGTH:
        raise _bad(name, "device_id_pattern", f"give a regular expression of 1 to {MAX_PATTERN_LENGTH} characters")
    try:
        return re.compile(pattern, re.ASCII)
    except (re.error, RecursionError, OverflowError) as exc:
        raise _bad(name, "device_id_pattern", f"not a regular expression ({exc})") from None


def configure(
    base: Profile,
    *,
    validity_days: int | None = None,
    key_usage_names: list[str] | None = None,
    extended_key_usage_names: list[str] | None = None,
    allow_server_auth: bool = False,
) -> Profile:
    """Profile ``base`` with the operator's settings, each checked against the RA's limits."""
    name = base.name
    changes: dict[str, object] = {}
    if validity_days is not None:
        if not 1 <= validity_days <= MAX_VALIDITY_DAYS:
            raise _bad(name, "validity_days", f"must be between 1 and {MAX_VALIDITY_DAYS}")
        changes["validity"] = dt.timedelta(days=validity_days)
    if key_usage_names is not None:
        changes["key_usage"] = key_usage(name, key_usage_names)
    if extended_key_usage_names is not None:
        changes["eku"] = extended_key_usage(name, extended_key_usage_names, allow_server_auth=allow_server_auth)
    elif allow_server_auth and name != "tls-server":
        raise _bad(name, "allow_server_auth", "set extended_key_usage too (allow_server_auth alone changes nothing)")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]
