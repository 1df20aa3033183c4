"""Revocation shared by ``iotdlm ca revoke``, ``ca revoke-ca`` and ``iotdlm device``: through a
running km if one answers, else directly in the store with the CA keys."""

from __future__ import annotations

from rich.table import Table

from iotdlm.cli.common import console, run
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.wire import km as msg

REASONS_HELP = (
    "RFC 5280 reason: keyCompromise, cACompromise, affiliationChanged, superseded, cessationOfOperation, "
    "privilegeWithdrawn, aACompromise (removeFromCRL and certificateHold are refused)"
)


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
    from iotdlm.pki.crl import revocation_reason
    from iotdlm.runtime import build_km, open_store

    reason = kwargs.get("reason")
    assert reason is None or isinstance(reason, str)
    revocation_reason(reason)  # refused here, before km is asked (km refuses it too)
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
            serial = int(str(kwargs["serial"]), 16)
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
    table = Table("serial", "issuer", "profile", "device", "revoked at", "reason")
    for r in revoked:
        table.add_row(
            r.serial, r.issuer, r.profile, r.device_id or "-", r.revoked_at or "-", r.revocation_reason or "-"
        )
    console.print(table)
    console.print(f"{len(revoked)} certificate(s) revoked {how}")


def is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
