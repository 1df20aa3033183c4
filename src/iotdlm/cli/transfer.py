"""``iotdlm transfer``: automated PKI trust transfer of a fleet (seed 003 VII), for the operators
of both providers. Listed in :data:`iotdlm.cli.main.COMMANDS` (imported when it runs).

SP1 (hands over)                             SP2 (takes over, runs CA2)
  transfer init --provider-id SP1              transfer init --provider-id SP2 --enroll-uri URL
                                               transfer register-ca --cert sp1-root.pem --cert sp1-factory-ca.pem
  transfer export ... --out uil.jws    ---->   transfer accept --in uil.jws ... --out tm.cwt
  transfer deliver --in tm.cwt  <-----------   (registers the x5bag with CA2, issues the TransferMessage)
     (one CWT per device, to cm / the devices)
                                               transfer confirm --transfer ID --out confirm.cwt
  transfer revoke-old --in confirm.cwt <-----
  transfer status                              transfer status

Or over HTTPS between the two deployments' cm (docs/adr/0011; SP1's km and cm running):
  transfer export ... --serve                  transfer accept --from https://sp1-cm:8443 --transfer ID \
    (cm serves the UpdateInfoList to the         --cacert sp1-root.pem --send ...
     SP2 named in it; km accepts the             (fetches with a signed request, posts the TransferMessage)
     TransferMessage and, on the                 transfer confirm --transfer ID --send https://sp1-cm:8443 \
     confirmation, revokes at CA1)                 --cacert sp1-root.pem

Exit codes as everywhere: 4 refused, 3 a dependency did not answer, 1 other errors.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from iotdlm.cli.common import EXIT_ERROR, console, data_option, err_console, handle_errors, run
from iotdlm.cli.output import (
    Column,
    check_out_dir,
    check_out_file,
    iso_utc,
    json_option,
    print_json,
    print_table,
    write_after_work,
)
from iotdlm.clock import SystemClock
from iotdlm.deployment import Deployment
from iotdlm.errors import BadRequestError, NotFoundError, UnavailableError
from iotdlm.pki.chain import certs_to_pem, load_certificate, load_certificates_pem
from iotdlm.transfer import status as st
from iotdlm.transfer.identity import TransferSettings, create_identity, load_identity, load_settings
from iotdlm.transfer.messages import VersionInfo

if TYPE_CHECKING:
    from iotdlm.store.transfer import TransferDeviceRecord, TransferRecord
    from iotdlm.transfer.peer_client import PeerClient

_path = click.Path(path_type=Path, dir_okay=False)
_existing = click.Path(path_type=Path, dir_okay=False, exists=True)


def _time(text: str | None, default: dt.datetime) -> dt.datetime:
    if text is None:
        return default
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise BadRequestError(f"{text!r} is not an ISO 8601 time (e.g. 2026-12-01T00:00:00+00:00)") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _cert(path: Path) -> x509.Certificate:
    return load_certificate(path.read_bytes())


def _default_enroll_uri(dep: Deployment) -> str:
    from urllib.parse import urlsplit

    host = urlsplit(dep.config.public_url).hostname or "127.0.0.1"
    return f"https://{host}:8443/.well-known/est"


_cacert_option = click.option(
    "--cacert",
    type=_existing,
    default=None,
    help="PEM root(s) that authenticate the peer's cm over HTTPS (default: the system's trust store).",
)


class _PeerLink:
    """SP2's link to SP1's cm for one transfer (:class:`iotdlm.transfer.peer_client.PeerClient`)."""

    def __init__(self, data: Path, url: str, tid: str, anchors: bytes | None, peer_id: str) -> None:
        from iotdlm.transfer.peer import check_tid

        self.data, self.url, self.tid, self.anchors, self.peer_id = data, url, check_tid(tid), anchors, peer_id

    def _client(self) -> PeerClient:
        from iotdlm.transfer.peer_client import PeerClient

        return PeerClient(
            self.url, identity=load_identity(self.data), peer_id=self.peer_id, anchors_pem=self.anchors,
            clock=SystemClock(),
        )  # fmt: skip

    async def fetch(self) -> bytes:
        async with self._client() as c:
            return await c.fetch_update_info(self.tid)

    async def send_transfer_message(self, token: bytes) -> str:
        async with self._client() as c:
            return await c.send_transfer_message(self.tid, token)

    async def send_confirmations(self, tokens: list[bytes]) -> list[str]:
        async with self._client() as c:
            return await c.send_confirmations(self.tid, tokens)


def _peer_link(data: Path, url: str, tid: str | None, cacert: Path | None, *, peer_id: str) -> _PeerLink:
    if not tid:
        raise BadRequestError("name the transfer (--transfer ID) to reach it at the peer's cm")
    return _PeerLink(data, url, tid, cacert.read_bytes() if cacert is not None else None, peer_id)


@click.group("transfer", context_settings={"help_option_names": ["-h", "--help"]})
def transfer() -> None:
    """Trust transfer: hand your fleet over to a new provider (you are SP1) or take one over (you are SP2).

    \b
    both providers:     init (once: --provider-id, this deployment's transfer identity)
    SP2 (taking over):  register-ca, then accept, publish-update, confirm
    SP1 (handing over): export, then deliver, revoke-old
    either:             status
    Every option of each command is in docs/operations.md (trust transfer).
    """


def _default_fallback_uri(dep: Deployment) -> str:
    """SP1's fallback route on its cm (``POST /transfer/fallback``, authenticated by the device)."""
    return _default_enroll_uri(dep).removesuffix("/.well-known/est") + "/transfer/fallback"


def _write_or_keep(data: Path, out: Path, token: bytes, *, done: str, what: str, name: str) -> None:
    """Write ``token`` to ``out`` (checked before the work); if that fails now that the work is
    done, keep it in DIR/transfer/exports/ and say where, exit code 1: nothing is left orphaned."""
    problem = write_after_work(out, token, done=done)
    if problem is None:
        return
    kept = data / "transfer" / "exports" / name
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_bytes(token)
    err_console.print(f"[red]error[/red] (write_failed): {problem}; the {what} is kept in {kept}: copy it from there")
    raise SystemExit(EXIT_ERROR)


@transfer.command("init")
@data_option
@click.option("--provider-id", required=True, help="This provider's name in transfer messages (agreed with the peer).")
@click.option("--fallback-uri", default=None, help="SP1: fallback route (default: cm /transfer/fallback).")
@click.option("--enroll-uri", default=None, help="SP2: CA2's EST URL, handed to the devices at registration.")
@handle_errors
def init(data: Path, provider_id: str, fallback_uri: str | None, enroll_uri: str | None) -> None:
    """Create this provider's transfer signing identity (needs the CA passphrase once)."""
    dep = Deployment.load(data)
    settings = TransferSettings(provider_id=provider_id, fallback_uri=fallback_uri, enroll_uri=enroll_uri)
    ident = create_identity(dep, settings, now=SystemClock().now())
    out = data / "transfer" / "identity" / "certificate.pem"
    out.write_bytes(certs_to_pem([ident.certificate]))
    fp = hashlib.sha256(ident.certificate.public_bytes(Encoding.DER)).hexdigest()
    console.print(f"[green]transfer identity created[/green] for {provider_id}")
    console.print(f"Give {out} to the peer provider (they pin it). SHA-256: {fp}")


@transfer.command("register-ca")
@data_option
@click.option("--cert", "certs", type=_existing, multiple=True, required=True, help="PEM file(s) of the permanent CA.")
@handle_errors
def register_ca(data: Path, certs: tuple[Path, ...]) -> None:
    """CA2: trust the permanent CA that issued another provider's factory certificates (its root
    and issuing CA). Only registered factory certificates of it will be able to enroll."""
    from iotdlm.km.registry import FactoryRegistry
    from iotdlm.runtime import open_store

    dep = Deployment.load(data)
    cas = [c for p in certs for c in load_certificates_pem(p.read_bytes())]
    store = open_store(dep)
    try:
        fps = FactoryRegistry(store, SystemClock()).register_cas(cas, actor="admin (transfer CLI)")
    finally:
        store.close()
    for c, fp in zip(cas, fps, strict=True):
        console.print(f"registered {c.subject.rfc4514_string()}  {fp[:16]}")
    console.print(f"cm takes them into its TLS trust when it starts: a running cm, `iotdlm restart --data {data} cm`")


@transfer.command("export")
@data_option
@click.option("--peer-id", required=True, help="SP2's provider id (the audience).")
@click.option("--peer-cert", type=_existing, required=True, help="SP2's agreed transfer certificate (PEM), pinned.")
@click.option("--device", "device_ids", multiple=True, help="A device to hand over. Repeatable.")
@click.option("--devices-file", type=_existing, default=None, help="File with one device id per line.")
@click.option("--not-before", default=None, help="updateTimeNotBefore (ISO 8601; default now).")
@click.option("--days", type=int, default=30, show_default=True, help="updateTimeNotAfter = not-before + days.")
@click.option("--suit-seq", type=int, default=0, show_default=True, help="suit-manifest-seq-number agreed.")
@click.option("--suit-uri", default="", help="suit-reference-uri agreed ({device} and {dtype} are filled in).")
@click.option(
    "--reference",
    type=_existing,
    default=None,
    help="Firmware image whose SHA-256 is the attestation reference (when remote attestation is agreed).",
)
@click.option("--out", type=_path, default=None, help="Where to write the signed UpdateInfoList (JWS).")
@click.option(
    "--serve", is_flag=True, help="Serve it to SP2 at cm: GET /transfer/<id>/update-info, signed by SP2's key."
)
@handle_errors
def export(
    data: Path,
    peer_id: str,
    peer_cert: Path,
    device_ids: tuple[str, ...],
    devices_file: Path | None,
    not_before: str | None,
    days: int,
    suit_seq: int,
    suit_uri: str,
    reference: Path | None,
    out: Path | None,
    serve: bool,
) -> None:
    """SP1: the signed UpdateInfoList (factory certificates, windows, versions) for SP2, as a file
    (--out) and/or served at cm to the SP2 named in it (--serve)."""
    from iotdlm.runtime import open_store
    from iotdlm.transfer.shell import Sp1Service

    ids = list(device_ids)
    if devices_file is not None:
        ids += [line.strip() for line in devices_file.read_text().splitlines() if line.strip()]
    if not ids:
        raise BadRequestError("name the devices to hand over (--device or --devices-file)")
    if out is None and not serve:
        raise BadRequestError("say where the UpdateInfoList goes: --out FILE, --serve (cm), or both")
    if out is not None:
        check_out_file(out)  # before the transfer is made
    dep = Deployment.load(data)
    settings = load_settings(data)
    clock = SystemClock()
    start = _time(not_before, clock.now())
    ref = hashlib.sha256(reference.read_bytes()).digest() if reference is not None else None
    store = open_store(dep)
    try:
        svc = Sp1Service(
            store=store, identity=load_identity(data), clock=clock, fallback_uri=settings.fallback_uri or ""
        )
        devs = store.get_devices(ids)
        tid, token = svc.export(
            ids,
            peer_id=peer_id,
            peer_certificate=_cert(peer_cert),
            not_before=start,
            not_after=start + dt.timedelta(days=days),
            version=lambda d: VersionInfo(
                suit_seq, suit_uri.format(device=d, dtype=devs[d].dtype if d in devs else "")
            ),
            references=dict.fromkeys(ids, ref) if ref is not None else None,
        )
    finally:
        store.close()
    console.print(f"transfer [bold]{tid}[/bold]: UpdateInfoList of {len(ids)} device(s)")
    if serve:
        from iotdlm.transfer.peer_handlers import publish_update_info

        publish_update_info(data, tid, token)
        console.print(f"served by cm to {peer_id} at /transfer/{tid}/update-info")
    if out is not None:
        _write_or_keep(data, out, token, done=f"transfer {tid} was made", what="UpdateInfoList", name=f"{tid}.jws")
        console.print(f"written to {out}")


@transfer.command("accept")
@data_option
@click.option("--in", "src", type=_existing, default=None, help="The UpdateInfoList (JWS) from SP1, as a file.")
@click.option("--from", "from_url", default=None, help="SP1's cm (https://...): fetch the UpdateInfoList there.")
@click.option("--transfer", "tid", default=None, help="With --from: the transfer id SP1 gave.")
@click.option("--send", is_flag=True, help="With --from: post the TransferMessage to SP1's cm.")
@_cacert_option
@click.option("--peer-id", required=True, help="SP1's provider id.")
@click.option("--peer-cert", type=_existing, required=True, help="SP1's agreed transfer certificate (PEM), pinned.")
@click.option("--enroll-uri", default=None, help="CA2's EST URL (default: transfer.toml, else cm on port 8443).")
@click.option("--ra-uri", default=None, help="Remote attestation verifier URL (omit: no attestation).")
@click.option("--update-uri", default="", help="SP2's update server.")
@click.option("--update-first", is_flag=True, help="Devices update from SP2 before enrolling.")
@click.option("--reset-not-before", default=None, help="ResetTimeNotBefore (ISO 8601; default now).")
@click.option("--reset-days", type=int, default=7, show_default=True, help="ResetTimeNotAfter = not-before + days.")
@click.option("--fallback-uri", default=None, help="fallbackURI (SP1 puts its own fallback route in its place).")
@click.option(
    "--anchor",
    "anchors",
    type=_existing,
    multiple=True,
    help="Root(s) authenticating SP2's endpoints, installed on the devices (default: this deployment's root).",
)
@click.option("--dtype", default=None, help="Device type of devices whose factory certificate names none.")
@click.option("--out", type=_path, default=None, help="Where to write the TransferMessage (CWT).")
@handle_errors
def accept(
    data: Path,
    src: Path | None,
    from_url: str | None,
    tid: str | None,
    send: bool,
    cacert: Path | None,
    peer_id: str,
    peer_cert: Path,
    enroll_uri: str | None,
    ra_uri: str | None,
    update_uri: str,
    update_first: bool,
    reset_not_before: str | None,
    reset_days: int,
    fallback_uri: str | None,
    anchors: tuple[Path, ...],
    dtype: str | None,
    out: Path | None,
) -> None:
    """SP2: check SP1's UpdateInfoList (--in a file, or --from SP1's cm), register the factory
    certificates with CA2 and write the TransferMessage for SP1 (--out, and/or --send)."""
    from iotdlm.km.registry import FactoryRegistry
    from iotdlm.runtime import open_store
    from iotdlm.transfer.shell import Sp2Service

    dep = Deployment.load(data)
    settings = load_settings(data)
    clock = SystemClock()
    start = _time(reset_not_before, clock.now())
    uri = enroll_uri or settings.enroll_uri or _default_enroll_uri(dep)
    roots = [c for p in anchors for c in load_certificates_pem(p.read_bytes())] or [dep.ca_certificate("root")]
    link = _peer_link(data, from_url, tid, cacert, peer_id=peer_id) if from_url else None
    if out is None and not send:
        raise BadRequestError("say where the TransferMessage goes: --out FILE, --send (to SP1's cm), or both")
    if out is not None:
        check_out_file(out)  # before the transfer is accepted
    if link is None and (src is None or send):
        raise BadRequestError(
            "give the UpdateInfoList: --in FILE, or --from SP1's cm with --transfer (--send needs it)"
        )
    uil = src.read_bytes() if src is not None else run(link.fetch()) if link is not None else b""
    store = open_store(dep)
    try:
        svc = Sp2Service(
            store=store,
            identity=load_identity(data),
            clock=clock,
            registrar=FactoryRegistry(store, clock, enroll_uri=uri),
        )
        tid, tm = svc.accept(
            uil,
            peer_id=peer_id,
            peer_certificate=_cert(peer_cert),
            reset_not_before=start,
            reset_not_after=start + dt.timedelta(days=reset_days),
            # SP1 puts its own fallback route into every per-device message (seed 003 VII-D)
            fallback_uri=fallback_uri or settings.fallback_uri or f"https://{peer_id}.invalid/transfer/fallback",
            ra_uri=ra_uri,
            update_uri=update_uri,
            update_first=update_first,
            trust_anchors=roots,
            dtype=dtype,
        )
        n = len(svc.status(tid))
    finally:
        store.close()
    console.print(f"transfer [bold]{tid}[/bold]: {n} device(s) registered with CA2 ({uri})")
    if out is not None:
        _write_or_keep(data, out, tm, done=f"transfer {tid} was accepted", what="TransferMessage", name=f"{tid}.cwt")
        console.print(f"TransferMessage in {out}")
    if send:
        assert link is not None
        console.print(f"SP1: {run(link.send_transfer_message(tm))}")


@transfer.command("deliver")
@data_option
@click.option("--in", "src", type=_existing, default=None, help="SP2's TransferMessage (CWT), as a file.")
@click.option(
    "--transfer",
    "tid",
    default=None,
    help="Instead of --in: the transfer whose TransferMessage SP2 posted to cm (accept --send).",
)
@click.option(
    "--out-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder for copies of the per-device messages (<device>.cwt), e.g. for air-gapped devices.",
)
@handle_errors
def deliver(data: Path, src: Path | None, tid: str | None, out_dir: Path | None) -> None:
    """SP1: validate SP2's TransferMessage (--in) or take the one SP2 posted to cm (--transfer), and
    make one signed CWT per device, kept for the devices to fetch from cm (GET /transfer/message)
    and, with --out-dir, written there."""
    from iotdlm.km.transfer_device_handlers import keep_messages
    from iotdlm.runtime import open_store
    from iotdlm.transfer.messages import TYP_TRANSFER_MESSAGE, peek_transfer_ref, transfer_id
    from iotdlm.transfer.peer import TID_RE
    from iotdlm.transfer.shell import Sp1Service

    if (src is None) == (tid is None):
        raise BadRequestError(
            "name SP2's TransferMessage: --in FILE, or --transfer ID for one SP2 posted to cm (accept --send)"
        )
    if tid is not None and not TID_RE.fullmatch(tid):
        raise BadRequestError(f"--transfer {tid[:80]!r}: a transfer id is 32 lower-case hex digits")
    if out_dir is not None:
        check_out_dir(out_dir, option="--out-dir")  # before the messages are made
    dep = Deployment.load(data)
    settings = load_settings(data)
    fallback_uri = settings.fallback_uri or _default_fallback_uri(dep)
    clock = SystemClock()
    store = open_store(dep)
    try:
        svc = Sp1Service(store=store, identity=load_identity(data), clock=clock, fallback_uri=fallback_uri)
        if src is not None:
            token = src.read_bytes()
            svc.accept(token)
            tid = transfer_id(peek_transfer_ref(token, typ=TYP_TRANSFER_MESSAGE))
        assert tid is not None
        msgs, skipped = svc.device_messages(tid)
        keep_messages(store, tid, msgs, clock.now())
    finally:
        store.close()
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            for device_id, cwt in msgs.items():
                (out_dir / f"{device_id}.cwt").write_bytes(cwt)
        except OSError as exc:
            err_console.print(
                f"[red]error[/red] (write_failed): transfer {tid}: {len(msgs)} device message(s) wait at cm "
                f"(GET /transfer/message), but copying them to {out_dir} failed ({exc.strerror or exc}); "
                f"`iotdlm transfer deliver --transfer {tid} --out-dir DIR` makes them again"
            )
            raise SystemExit(EXIT_ERROR) from None
    copies = f", copies in {out_dir}" if out_dir is not None else ""
    console.print(
        f"transfer [bold]{tid}[/bold]: {len(msgs)} device message(s) waiting at cm (GET /transfer/message)"
        f"{copies}; devices that fall back report to {fallback_uri}"
    )
    for device_id, why in sorted(skipped.items()):
        console.print(f"[yellow]skipped[/yellow] {device_id}: {why}")


@transfer.command("confirm")
@data_option
@click.option("--transfer", "tid", required=True, help="Transfer id.")
@click.option("--out", type=_path, default=None, help="Where to write the confirmation (CWT) for SP1.")
@click.option("--send", "send_to", default=None, help="SP1's cm (https://...): post the confirmation there.")
@_cacert_option
@handle_errors
def confirm(data: Path, tid: str, out: Path | None, send_to: str | None, cacert: Path | None) -> None:
    """SP2: confirm to SP1 the devices CA2 has enrolled (SP1 then revokes their old certificates):
    as a file (--out) and/or posted to SP1's cm (--send). Over the network the confirmation goes in
    parts of 1,000 devices (SP1 revokes each part before it answers); with --out too, each part is
    a file."""
    from iotdlm.km.registry import FactoryRegistry
    from iotdlm.runtime import open_store
    from iotdlm.transfer.messages import MAX_CONFIRMATION_BYTES
    from iotdlm.transfer.peer_parts import PeerLimits
    from iotdlm.transfer.shell import Sp2Service

    if out is None and send_to is None:
        raise BadRequestError("say where the confirmation goes: --out FILE, --send SP1's cm, or both")
    if out is not None:
        check_out_file(out)  # before the confirmation is made
    link = _peer_link(data, send_to, tid, cacert, peer_id="") if send_to else None
    dep = Deployment.load(data)
    clock = SystemClock()
    store = open_store(dep)
    try:
        svc = Sp2Service(
            store=store, identity=load_identity(data), clock=clock, registrar=FactoryRegistry(store, clock)
        )
        limits = PeerLimits()
        if link is not None:  # each part one request to SP1's cm, answered once CA1 has revoked
            tokens = svc.confirm_parts(tid, max_bytes=limits.max_body_bytes, max_devices=limits.confirmation_devices)
        else:
            tokens = svc.confirm_parts(tid, max_bytes=MAX_CONFIRMATION_BYTES)
        n = sum(1 for r in svc.status(tid).values() if r.status == st.ENROLLED)
    finally:
        store.close()
    parts = f" in {len(tokens)} parts" if len(tokens) > 1 else ""
    console.print(f"transfer [bold]{tid}[/bold]: {n} enrolled device(s) confirmed{parts}")
    if out is not None:
        names = (
            [out]
            if len(tokens) == 1
            else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(1, len(tokens) + 1)]
        )
        done = f"transfer {tid}: {n} enrolled device(s) confirmed{parts}"
        for i, (name, token) in enumerate(zip(names, tokens, strict=True), start=1):
            kept = f"{tid}.confirm.cwt" if len(tokens) == 1 else f"{tid}.confirm-{i}.cwt"
            _write_or_keep(data, name, token, done=done, what="confirmation", name=kept)
        console.print(f"confirmation in {', '.join(map(str, names))}")
    if link is not None:
        for said in run(link.send_confirmations(tokens)):
            console.print(f"SP1: {said}")


@transfer.command("revoke-old")
@data_option
@click.option(
    "--in", "srcs", type=_existing, required=True, multiple=True,
    help="SP2's confirmation (CWT); repeat it for a confirmation in parts.",
)  # fmt: skip
@handle_errors
def revoke_old(data: Path, srcs: tuple[Path, ...]) -> None:
    """SP1: on SP2's confirmation, have CA1 revoke the devices' old operational certificates
    (through a running km if one answers, else directly with the CA keys)."""
    from iotdlm.runtime import build_km, connect_identity, km_trust, open_store, sealer_for
    from iotdlm.transfer.shell import KmRevoker, LocalRevoker, Sp1Service

    dep = Deployment.load(data)
    settings = load_settings(data)
    clock = SystemClock()
    tokens = [src.read_bytes() for src in srcs]
    store = open_store(dep)
    try:
        svc = Sp1Service(
            store=store, identity=load_identity(data), clock=clock, fallback_uri=settings.fallback_uri or ""
        )

        async def through_km() -> list[str]:
            from iotdlm.client.km import KmClient

            bus, ident = await connect_identity(dep, "admin")
            try:
                km = KmClient(bus, sealer_for(ident), clock, trust=km_trust(dep))
                return [d for token in tokens for d in await svc.revoke_old(token, KmRevoker(km, store))]
            finally:
                await bus.close()

        async def directly() -> list[str]:
            kmcore = build_km(dep, store, clock)
            assert kmcore.va is not None
            return [d for t in tokens for d in await svc.revoke_old(t, LocalRevoker(store, kmcore.va, clock))]

        try:
            done, how = run(through_km()), "through km"
        except UnavailableError:
            done, how = run(directly()), "directly in the store"
    finally:
        store.close()
    console.print(f"{len(done)} device(s) revoked-at-CA1 ({how})")


@transfer.command("status")
@data_option
@click.option("--transfer", "tid", default=None, help="One transfer (default: list the transfers).")
@click.option("--role", type=click.Choice(["sp1", "sp2"]), default=None, help="This provider's role in it.")
@click.option("--devices/--no-devices", default=False, help="List every device, not only the counts.")
@json_option
@handle_errors
def status(data: Path, tid: str | None, role: str | None, devices: bool, as_json: bool) -> None:
    """Per-device status at this provider: pending, fetched, reset, attested, updated, enrolled,
    revoked-at-CA1, failed-fallback; and how many devices refused a transfer message (replayed,
    expired, altered, wrong signer: `iotdlm audit list --kind device_refusal` has each report)."""
    from iotdlm.runtime import open_store
    from iotdlm.transfer.shell import counts

    dep = Deployment.load(data)
    store = open_store(dep)
    try:
        roles = [role] if role else ["sp1", "sp2"]
        found = [(r, rec) for r in roles for rec in store.list_transfers(r) if tid is None or rec.transfer_id == tid]
        if not found:
            raise NotFoundError("no transfer here" + (f" with id {tid}" if tid else ""))
        rows = [(r, rec, store.get_transfer_devices(r, rec.transfer_id)) for r, rec in found]
    finally:
        store.close()
    if as_json:
        print_json({"transfers": [_transfer_json(r, rec, devs, devices=devices) for r, rec, devs in rows]})
        return
    columns = (
        Column("transfer", whole=True),
        Column("role"),
        Column("devices", whole=True),
        Column("by status", min=16),
        Column("last change (UTC)", whole=True, drop=1),
    )
    table_rows = []
    for r, rec, devs in rows:
        c = counts(devs)
        lines = [f"{s} {c[s]}" for s in st.STATUSES if c[s]]
        refused = _refused(devs)
        if refused:
            lines.append(f"refused a message: {refused}")
        table_rows.append([rec.transfer_id, r, str(len(devs)), "\n".join(lines) or "-", _when(rec.updated_at)])
    print_table(console, columns, table_rows)
    if devices:
        device_columns = (
            Column("device", whole=True),
            Column("status"),
            Column("last change (UTC)", whole=True, drop=2),
            Column("last refused message", drop=1, min=16),
        )
        for r, rec, devs in rows:
            device_rows = [
                [d, devs[d].status, _when(devs[d].updated_at), st.last_refusal(devs[d].detail) or "-"]
                for d in sorted(devs)
            ]
            print_table(console, device_columns, device_rows, title=f"{rec.transfer_id} ({r})")


def _refused(rows: dict[str, TransferDeviceRecord]) -> int:
    """How many devices of a transfer refused a transfer message (their last report is kept)."""
    return sum(1 for row in rows.values() if st.last_refusal(row.detail))


def _when(t: dt.datetime) -> str:
    return (iso_utc(t) or "").replace("T", " ").rstrip("Z")


def _transfer_json(
    role: str, rec: TransferRecord, rows: dict[str, TransferDeviceRecord], *, devices: bool
) -> dict[str, object]:
    """One transfer as `transfer status --json` gives it (keys in docs/operations.md)."""
    from iotdlm.transfer.shell import counts

    c = counts(rows)
    out: dict[str, object] = {
        "transfer_id": rec.transfer_id,
        "role": role,
        "state": rec.state,
        "devices": len(rows),
        "counts": {s: c[s] for s in st.STATUSES},
        "refused": _refused(rows),
        "created_at": iso_utc(rec.created_at),
        "updated_at": iso_utc(rec.updated_at),
    }
    if devices:
        out["device_status"] = [
            {
                "device_id": d,
                "status": rows[d].status,
                "updated_at": iso_utc(rows[d].updated_at),
                "last_refused_message": st.last_refusal(rows[d].detail) or None,
            }
            for d in sorted(rows)
        ]
    return out


@transfer.command("publish-update")
@data_option
@click.option("--transfer", "tid", required=True, help="Transfer id (taken over here, as SP2).")
@click.option("--image", type=_existing, required=True, help="The image the devices install before enrolling.")
@click.option("--version", "version", required=True, help="The image's version (the devices report it back).")
@handle_errors
def publish_update(data: Path, tid: str, image: Path, version: str) -> None:
    """SP2: the image devices of a transfer fetch at cm's GET /transfer/update (the updateURI to
    give `accept --update-uri`: https://<cm>:8443/transfer/update). km serves it from
    DIR/transfer/updates/<transfer>/."""
    from iotdlm.km.transfer_device_handlers import publish_update as publish
    from iotdlm.runtime import open_store

    dep = Deployment.load(data)
    store = open_store(dep)
    try:
        if store.get_transfer("sp2", tid) is None:
            raise NotFoundError(f"no transfer {tid[:64]} taken over here (as SP2)")
    finally:
        store.close()
    where = publish(data / "transfer" / "updates", tid, image.read_bytes(), version)
    console.print(f"transfer [bold]{tid}[/bold]: update {version} published in {where}")
