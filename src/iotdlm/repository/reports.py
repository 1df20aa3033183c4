"""Download reports (paper 4.4.5): sm's signed reports of verified downloads, checked and kept.

``reports.jsonl`` holds every report accepted, append-only; a report's nonce is spent once (replays
are refused across processes: each reads the nonces appended since it last looked). Signers'
certificates must chain to a CA in ``report-ca.pem`` (:func:`check_ca_bundle`), for clientAuth.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotdlm.errors import BadRequestError, NotFoundError, ReplayError, UntrustedError
from iotdlm.pki.chain import load_certificate, load_certificates_pem, verify_issued_by
from iotdlm.pki.keys import algorithm_of, check_public_key
from iotdlm.repository.storage import (
    PublishedLine,
    PublishedTarget,
    append_line,
    complete_lines,
    file_lock,
    json_encoder,
    utc,
)
from iotdlm.wire import envelope
from iotdlm.wire.report import (
    MAX_REPORT_BYTES,
    OP_REPORT,
    REPORT_AUDIENCE,
    ReportBody,
    decode_report_body,
    verified_time,
)

MAX_CA_BUNDLE_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class Report:
    """A verified download report from sm (paper 4.4.5)."""

    dtype: str
    release_counter: int
    target_path: str
    sha256: str
    reporter: str  # subject CN of the certificate that signed the report
    received_at: dt.datetime
    nonce: str
    verified_at: dt.datetime | None = None
    length: int | None = None


class ReportLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    release_counter: int
    target_path: str
    sha256: str
    length: int
    reporter: str
    received_at: dt.datetime
    verified_at: dt.datetime
    nonce: str
    serial: str


_report_line_decoder = msgspec.json.Decoder(ReportLine)


class ReportLog:
    """``reports.jsonl`` and the nonces its reports spent."""

    def __init__(self, file: Path, lock_file: Path) -> None:
        self.file = file
        self.lock_file = lock_file
        self._lock = threading.Lock()
        self._nonces: set[str] = set()
        self._offset = 0

    def record(
        self,
        token: bytes,
        *,
        now: dt.datetime,
        cas: Callable[[], list[x509.Certificate]],
        published: Callable[[], dict[tuple[str, str], PublishedLine]],
    ) -> Report:
        """Verify sm's signed report of a verified download and append it to ``reports.jsonl``.

        Order: bounded header parse -> signer certificate issued by a trusted report CA and valid
        -> JWS signature, op, aud, time window -> body -> nonce never seen -> the target was
        published with that hash -> recorded. Any failure raises (BadRequestError, TooLargeError,
        UntrustedError, BadSignatureError, ReplayError, NotFoundError) and records nothing.
        ``cas`` gives the trusted report CAs, ``published`` the targets published, by (path, sha256).
        """
        now = utc(now)
        alg, leaf = envelope.peek_signer(token, max_bytes=MAX_REPORT_BYTES)
        cert, key = trusted_reporter(cas(), leaf, alg, now)
        env = envelope.verify(token, cert, key, alg=alg, op=OP_REPORT, aud=REPORT_AUDIENCE, now=now)
        body = decode_report_body(env.body)
        verified_at = verified_time(body)
        with file_lock(self.lock_file, self._lock):
            self._sync_nonces()
            if env.nonce in self._nonces:
                raise ReplayError("this report was received before (its nonce is spent)", field="nonce")
            entry = published().get((body.target_path, body.sha256))
            if entry is None:
                raise NotFoundError(
                    f"no target {body.target_path} with sha256 {body.sha256} was published here", field="target_path"
                )
            if (entry.dtype, entry.release_counter, entry.length) != (body.dtype, body.release_counter, body.length):
                raise BadRequestError(
                    f"report says {body.target_path} is release {body.release_counter} of {body.dtype} "
                    f"({body.length} bytes); it was published as release {entry.release_counter} of "
                    f"{entry.dtype} ({entry.length} bytes)",
                    field="release_counter",
                )
            line = ReportLine(
                dtype=body.dtype,
                release_counter=body.release_counter,
                target_path=body.target_path,
                sha256=body.sha256,
                length=body.length,
                reporter=_cn(cert),
                received_at=now,
                verified_at=verified_at,
                nonce=env.nonce,
                serial=format(cert.serial_number, "x"),
            )
            append_line(self.file, json_encoder.encode(line))
            self._nonces.add(env.nonce)
            self._offset = self.file.stat().st_size
        return _report_of(line)

    def all(self) -> list[Report]:
        """Every recorded report, oldest first."""
        return [_report_of(_report_line_decoder.decode(line)) for line in complete_lines(self.file)]

    def _sync_nonces(self) -> None:
        """Read the nonces of reports appended since last time (by any process)."""
        if not self.file.exists():
            return
        with self.file.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < self._offset:
                self._nonces.clear()
                self._offset = 0
            f.seek(self._offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            if line.strip():
                self._nonces.add(_report_line_decoder.decode(line).nonce)
        self._offset += len(complete)


def trusted_reporter(
    cas: list[x509.Certificate], leaf: bytes, alg: str, now: dt.datetime
) -> tuple[x509.Certificate, envelope.JoseKey]:
    """The report signer's certificate (issued by one of ``cas`` for clientAuth, valid at ``now``) and its key."""
    if not cas:
        raise UntrustedError(
            "this repository trusts no CA for download reports; configure one with `iotdlm repo trust --ca FILE`"
        )
    cert = load_certificate(leaf)
    try:
        subject = cert.subject.rfc4514_string()
        candidates = [ca for ca in cas if ca.subject == cert.issuer]
        if not candidates:
            raise UntrustedError(f"report signer {subject} is not issued by a CA this repository trusts")
        failure: UntrustedError | None = None
        for ca in candidates:
            if not (ca.not_valid_before_utc <= now <= ca.not_valid_after_utc):
                failure = UntrustedError(f"report CA {ca.subject.rfc4514_string()} is not valid now")
                continue
            try:
                verify_issued_by(cert, ca, now=now, eku=ExtendedKeyUsageOID.CLIENT_AUTH)
            except UntrustedError as exc:
                failure = exc
                continue
            public = check_public_key(cert.public_key())
            if envelope.JWS_ALG[algorithm_of(public)] != alg:
                raise BadRequestError(f"JWS algorithm {alg} does not match the signer's key", field="alg")
            return cert, envelope.jose_key(public)
        assert failure is not None
        raise failure
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # cryptography parses extensions and keys lazily: a malformed one surfaces here
        raise UntrustedError("report signer certificate has a malformed extension or public key") from exc


def _cn(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        value = cns[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return cert.subject.rfc4514_string()


def check_ca_bundle(data: bytes) -> list[x509.Certificate]:
    if len(data) > MAX_CA_BUNDLE_BYTES:
        raise BadRequestError(f"CA bundle of {len(data)} bytes exceeds the limit of {MAX_CA_BUNDLE_BYTES}")
    certs = load_certificates_pem(data)
    if not certs:
        raise BadRequestError("the CA bundle holds no certificate")
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        except ValueError as exc:
            raise BadRequestError("a certificate in the CA bundle has a malformed basicConstraints extension") from exc
        if bc is None or not bc.ca:
            raise BadRequestError(
                f"{cert.subject.rfc4514_string()} in the CA bundle is not a CA certificate (basicConstraints cA)"
            )
    return certs


def _report_of(line: ReportLine) -> Report:
    return Report(
        dtype=line.dtype,
        release_counter=line.release_counter,
        target_path=line.target_path,
        sha256=line.sha256,
        reporter=line.reporter,
        received_at=line.received_at,
        nonce=line.nonce,
        verified_at=line.verified_at,
        length=line.length,
    )


def report_body(target: PublishedTarget, *, verified_at: dt.datetime) -> dict[str, Any]:
    """The body sm seals (op ``repository.report``, aud ``repository``) to report ``target`` verified."""
    body = ReportBody(
        dtype=target.dtype,
        release_counter=target.release_counter,
        target_path=target.path,
        sha256=target.sha256,
        length=target.length,
        verified_at=utc(verified_at),
    )
    out: dict[str, Any] = msgspec.to_builtins(body)
    return out


__all__ = [
    "MAX_CA_BUNDLE_BYTES",
    "Report",
    "ReportLine",
    "ReportLog",
    "check_ca_bundle",
    "report_body",
    "trusted_reporter",
]
