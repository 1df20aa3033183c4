"""Revocation shared by ``iotdlm ca revoke``, ``ca revoke-ca`` and ``iotdlm device``: through a
running km if one answers, else directly in the store with the CA keys."""

from __future__ import annotations

from iotdlm.cli.common import console, run
from iotdlm.cli.output import Column, parse_serial, print_table
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError
from iotdlm.pki import crl as pki_crl
from iotdlm.wire import km as msg


def _accepted(name: str) -> bool:
    try:
        pki_crl.revocation_reason(name)
    except BadRequestError:
        return False
    return True


#: the reasons a revocation may give: RFC 5280's, less those the CA refuses (one source of truth
#: for --help and the refusal alike: iotdlm.pki.crl)
REVOCATION_REASONS: tuple[str, ...] = tuple(r for r in pki_crl.REASONS if _accepted(r))
REFUSED_REASONS: tuple[str, ...] = tuple(r for r in pki_crl.REASONS if r not in REVOCATION_REASONS)

REASONS_HELP = f"Why (RFC 5280 reason): {', '.join(REVOCATION_REASONS)}. Refused: {', '.join(REFUSED_REASONS)}."


def check_reason(reason: str | None) -> None:
    """Refuse a reason the CA will not take, listing the same reasons as --help."""
    if reason is None:
        return
    try:
        pki_crl.parse_reason(reason)
    except BadRequestError:
        shown = reason if len(reason) <= 40 else reason[:37] + "..."
        raise BadRequestError(
            f"unknown revocation reason {shown!r}; give one of: {', '.join(REVOCATION_REASONS)}.", field="reason"
        ) from None
    pki_crl.revocation_reason(reason)  # removeFromCRL, certificateHold: refused, saying why


async def _revoke_remote(dep: Deployment, **kwargs: object) -> list[msg.CertificateInfo]:
    from iotdlm.client.km import KmClient
    from iotdlm.runtime import connect_identity, km_trust, sealer_for

    bus, ident = await connect_identity(dep, "admin")
    try:
        return await KmClient(bus, sealer_for(ident), SystemClock(), trust=km_trust(dep)).revoke(**kwargs)  # type: ignore[arg-type]
    finally:
        await bus.close()


def revoke(dep: Deployment, **kwargs: object) -> tuple[list[msg.CertificateInfo], str]:
    """Revoke through a running km (so every worker drops cached OCSP answers at once); if none
    answers, revoke directly in the store with the CA keys (needs the CA passphrase)."""
    from iotdlm.errors import UnavailableError
    from iotdlm.km.cert_views import info
    from iotdlm.runtime import build_km, open_store

    reason = kwargs.get("reason")
    assert reason is None or isinstance(reason, str)
    check_reason(reason)  # refused here, before km is asked (km refuses it too)
    try:
        return run(_revoke_remote(dep, **kwargs)), "through km"
    except UnavailableError:
        pass
    store = open_store(dep)
    try:
        kmcore = build_km(dep, store, SystemClock())
        assert kmcore.va is not None
        va = kmcore.va
        actor = "admin (local CLI)"
        if kwargs.get("ca") is not None:
            recs = [va.revoke_ca(str(kwargs["ca"]), reason=reason, actor=actor)]
        elif kwargs.get("serial") is not None:
            serial = parse_serial(str(kwargs["serial"]))
            issuer = kwargs.get("issuer")
            recs = [va.revoke(serial, issuer=issuer if isinstance(issuer, str) else None, reason=reason, actor=actor)]
        elif kwargs.get("decommission"):
            recs = va.decommission(str(kwargs["device_id"]), actor=actor, reason=reason or "cessationOfOperation")
        else:
            recs = va.revoke_device(str(kwargs["device_id"]), reason=reason, actor=actor)
        return [info(r) for r in recs], "directly in the store (km not reachable)"
    finally:
        store.close()


def print_revoked(revoked: list[msg.CertificateInfo], how: str) -> None:
    columns = (
        Column("serial", whole=True),
        Column("device", whole=True),
        Column("reason"),
        Column("revoked at", drop=1),
        Column("profile", drop=2),
        Column("issuer", drop=3),
    )
    rows = [
        [r.serial, r.device_id or "-", r.revocation_reason or "-", r.revoked_at or "-", r.profile, r.issuer]
        for r in revoked
    ]
    print_table(console, columns, rows, has_json=False)
    console.print(f"{len(revoked)} certificate(s) revoked {how}")


def is_hex(text: str) -> bool:
    """Whether ``text`` is a serial as :func:`iotdlm.cli.output.parse_serial` reads it."""
    try:
        parse_serial(text)
    except BadRequestError:
        return False
    return True
