"""Every kind of certificate iotdlm issues, for the C509 tests: root, issuing CAs, and one
end-entity certificate per profile, built with iotdlm.pki itself (tests/helpers.make_pki)."""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509

from iotdlm.pki import ca as pki_ca
from iotdlm.pki.keys import Algorithm, generate_key
from iotdlm.pki.names import DEFAULT_ENTERPRISE_NUMBER, device_subject, module_uri
from iotdlm.pki.profiles import DEFAULT_PROFILES
from tests.helpers import ORG, URLS, make_pki


def issued_kinds(
    alg: Algorithm, *, now: dt.datetime, device_id: str = "dev-0001", serial: int = 0x1F50D
) -> dict[str, x509.Certificate]:
    """root, the three issuing CAs, and factory / operational / service / tls-server / ocsp."""
    pki = make_pki(alg, now=now)
    out: dict[str, x509.Certificate] = {"root": pki.root}
    out |= {f"{name} CA": ca.certificate for name, ca in pki.cas.items()}
    subject = device_subject(device_id, ORG, "sensor")
    for kind in ("factory", "operational"):
        profile = DEFAULT_PROFILES[kind]
        out[kind] = pki.cas[kind].issue(
            profile,
            generate_key(alg).public_key(),
            subject,
            now=now,
            serial=serial,
            general_names=profile.device_names(device_id, "sensor"),
            urls=URLS,
        )
    module = pki_ca.ca_name("km", ORG)
    km_uri = module_uri("km", enterprise_number=DEFAULT_ENTERPRISE_NUMBER)
    for kind, issuer in (("service", "service"), ("tls-server", "service"), ("ocsp", "operational")):
        out[kind] = pki.cas[issuer].issue(
            DEFAULT_PROFILES[kind],
            generate_key(alg).public_key(),
            module,
            now=now,
            serial=serial + 1,
            uris=[km_uri],
            dns_names=["localhost"] if kind == "tls-server" else [],
            ip_addresses=[ipaddress.ip_address("127.0.0.1")],
            urls=URLS,
        )
    return out
