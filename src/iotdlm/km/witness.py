"""An outside witness of km's audit log (issue 11 section 2, docs/adr/0005-audit-anchors.md).

Transparency logs keep their operator honest with witnesses (RFC 9162 section 8.2; Trillian,
Sigstore's Rekor): parties outside the operator that keep the newest signed tree head they have
seen and, on each visit, check that the log's new head extends it. ``iotdlm audit witness`` is one:

1. fetch cm's ``GET /audit/checkpoint`` (km's newest signed tree head) and verify its signature:
   the certificate it carries must be issued by the service CA the witness was given, name module
   km, have the head's signer fingerprint and be valid when the head was signed;
2. if the state folder holds an earlier head of M records and cm now serves N:
   N < M is truncation; N == M with another root or chain hash is a rewrite; N > M fetches
   ``GET /audit/consistency?first=M&second=N`` and checks it with
   :func:`iotdlm.wire.merkle.verify_consistency` (RFC 9162 2.1.4.2) -- a failing proof is a rewrite;
3. keep the new head in the state folder (one file per size, as the anchor folder: the folder can
   be handed to ``iotdlm audit verify --anchor-dir``).

The checks (:func:`verify_signed_head`, :func:`check_extends`) are pure; :func:`witness` is the
I/O around them.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from cryptography import x509

from iotdlm.errors import BadRequestError, BadSignatureError, RejectedError, UnavailableError, UntrustedError
from iotdlm.km.audit import read_anchor_dir, write_anchor
from iotdlm.pki.ca import fingerprint
from iotdlm.pki.chain import load_certificate, verify_issued_by
from iotdlm.pki.keys import check_public_key, verify_bytes
from iotdlm.pki.names import module_of
from iotdlm.wire import audit as fmt
from iotdlm.wire import merkle

#: the most a witness reads of one answer from cm
MAX_ANSWER = 64 * 1024


class LogInconsistentError(RejectedError):
    """The log cm serves does not extend the tree head this witness kept: truncated or rewritten."""

    code = "log_inconsistent"


@dataclass(frozen=True)
class WitnessResult:
    #: the head kept before this visit (None on the first)
    kept: fmt.TreeHead | None
    #: the head cm serves now, verified and kept
    new: fmt.TreeHead

    @property
    def summary(self) -> str:
        new = f"{self.new.size} records (signed {self.new.at.isoformat(timespec='seconds')})"
        if self.kept is None:
            return f"first visit: kept the signed tree head of {new}"
        if self.kept.size == self.new.size:
            return f"unchanged since the last visit: {new}"
        return f"consistent: the log of {new} extends the {self.kept.size} records kept before"


def verify_signed_head(th: fmt.TreeHead, service_ca: x509.Certificate, *, where: str) -> None:
    """Raise :class:`~iotdlm.errors.UntrustedError` unless ``th`` is signed by a km certificate
    of ``service_ca`` (the certificate the head carries) that was valid when it was signed."""
    der = fmt.certificate_der(th)
    if der is None:
        raise UntrustedError(f"{where} carries no signer certificate: it cannot be checked against the service CA")
    try:
        cert = load_certificate(der)
    except BadRequestError as exc:
        raise UntrustedError(f"{where}: the signer {exc.message}") from exc
    if fingerprint(cert) != th.signer:
        raise UntrustedError(f"{where}: the certificate it carries is not its signer {th.signer[:16]}")
    if cert.issuer != service_ca.subject:
        raise UntrustedError(f"{where}: the signer certificate is not issued by the service CA given")
    verify_issued_by(cert, service_ca, now=th.at, eku=None)
    ident = module_of(cert)
    if ident is None or ident[0] != "km":
        raise UntrustedError(
            f"{where}: the signer certificate names {'no module' if ident is None else ident[0]}, not km"
        )
    try:
        verify_bytes(
            check_public_key(cert.public_key()),
            bytes.fromhex(th.signature),
            fmt.tree_head_message(th.size, th.hash, th.root, th.at),
        )
    except BadSignatureError as exc:
        raise UntrustedError(f"{where} (record {th.size}) has a bad signature") from exc


def check_extends(kept: fmt.TreeHead, new: fmt.TreeHead, proof: fmt.ConsistencyProof | None) -> None:
    """Raise :class:`LogInconsistentError`, naming both sizes, unless ``new`` extends ``kept``
    (``proof``: the consistency proof between them, needed when ``new`` is larger)."""
    kept_words = f"the signed tree head of {kept.size} records this witness kept (signed {kept.at.isoformat()})"
    if new.size < kept.size:
        raise LogInconsistentError(
            f"the audit log was truncated: cm serves a signed tree head of {new.size} records, "
            f"smaller than {kept_words}"
        )
    if new.size == kept.size:
        if (new.root, new.hash) != (kept.root, kept.hash):
            raise LogInconsistentError(
                f"the audit log was rewritten: cm serves a signed tree head of {new.size} records whose "
                f"root differs from {kept_words}"
            )
        return
    if proof is None or (proof.first, proof.second) != (kept.size, new.size):
        raise ValueError("a consistency proof between the two sizes is needed")
    hashes = [bytes.fromhex(h) for h in proof.proof]
    if not merkle.verify_consistency(kept.size, new.size, bytes.fromhex(kept.root), bytes.fromhex(new.root), hashes):
        raise LogInconsistentError(
            f"the audit log was rewritten: the consistency proof between {kept.size} and {new.size} records "
            f"fails: the log of {new.size} records cm serves does not extend {kept_words}"
        )


def kept_head(state: Path) -> fmt.TreeHead | None:
    """The largest tree head in the witness's state folder (None if it holds none yet)."""
    if not state.exists():
        return None
    heads, bad = read_anchor_dir(state)
    if bad:
        raise BadRequestError(f"the witness state folder {state} holds what it did not write: {bad[0]}")
    return max((a.head for a in heads), key=lambda h: h.size, default=None)


def tls_context(tls_ca: Path | None) -> ssl.SSLContext:
    """The system's trust store, or ``tls_ca`` (PEM) to check cm's HTTPS certificate."""
    try:
        return ssl.create_default_context(cafile=str(tls_ca) if tls_ca is not None else None)
    except (OSError, ssl.SSLError) as exc:
        raise BadRequestError(f"cannot use {tls_ca} as the TLS trust anchor: {exc}") from None


async def _get(session: aiohttp.ClientSession, url: str, what: str) -> bytes:
    try:
        async with session.get(url) as resp:
            # read() returns what has arrived so far, not the whole body: read until EOF or over the limit
            body = b""
            while len(body) <= MAX_ANSWER:
                chunk = await resp.content.read(MAX_ANSWER + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            if len(body) > MAX_ANSWER:
                raise UnavailableError(f"{what} from {url} is over {MAX_ANSWER} bytes")
            if resp.status == 409:  # km: the store lacks records the proof needs
                raise LogInconsistentError(f"{what}: cm answered 409: {body[:300].decode('utf-8', 'replace')}")
            if resp.status != 200:
                raise UnavailableError(f"{what}: {url} answered {resp.status}: {body[:300].decode('utf-8', 'replace')}")
            return body
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise UnavailableError(f"{what}: cannot reach {url}: {exc or type(exc).__name__}") from exc


async def witness(
    url: str, state: Path, service_ca: x509.Certificate, *, tls: ssl.SSLContext | None = None, within: float = 30.0
) -> WitnessResult:
    """One visit (see the module doc); raises :class:`LogInconsistentError` on truncation or a
    rewrite, and keeps nothing then."""
    base = url.rstrip("/")
    if not base.startswith(("https://", "http://")):
        raise BadRequestError(f"--url must be cm's https:// address, not {url!r}", field="url")
    kept = kept_head(state)
    client_timeout = aiohttp.ClientTimeout(total=within)
    async with aiohttp.ClientSession(timeout=client_timeout, connector=aiohttp.TCPConnector(ssl=tls or True)) as s:
        where = f"{base}/audit/checkpoint"
        new = fmt.decode_tree_head(await _get(s, where, "the signed tree head"), where=where)
        verify_signed_head(new, service_ca, where=where)
        proof = None
        if kept is not None and new.size > kept.size:
            where = f"{base}/audit/consistency?first={kept.size}&second={new.size}"
            proof = fmt.decode_consistency_proof(await _get(s, where, "the consistency proof"), where=where)
            if (proof.first, proof.second) != (kept.size, new.size):
                raise UntrustedError(f"{where} answered a proof for {proof.first}..{proof.second}")
    if kept is not None:
        check_extends(kept, new, proof)
    write_anchor(state, new)
    return WitnessResult(kept=kept, new=new)
