"""A simulated device whose flash is a folder.

Layout of a device folder::

    DEV/hardware.json         what the hardware is (device id from the "sticker", dtype, capabilities)
    DEV/flash/slot-a/         boot image slots: image + image.json
    DEV/flash/slot-b/
    DEV/flash/truststore/     CA certificates (PEM), installed by provisioning; a constrained device
                              (hardware ``truststore_format`` "c509") keeps them in one C509 bag,
                              truststore.c509 (COSE_C509), decoded to DER when they are used
    DEV/flash/certs/          the device's certificates: factory.pem, operational.pem; a constrained
                              (c509) device keeps them as factory.c509, operational.c509 (C509,
                              re-encoded: decoded back to the identical DER when used), and its TLS
                              stack (the HTTPS routes) gets a PEM copy in DEV/ram/ (not flash)
    DEV/flash/config.json     device id, dtype, enroll URI (CA-URI), update URI, ...
    DEV/secure/key.pem        the device key (its factory certificate certifies it): generated ON
                              the device, never read out
    DEV/secure/operational.pem  the operational key, separate from the device key: made on the
                              device at enrollment (EST) and at each re-enrollment, never read out
    DEV/secure/pending.pem    a new key pair waiting for its certificate (re-enrollment, or CA2's
                              in trust transfer): installed as the operational key with that
                              certificate, destroyed when the request fails or the transfer rolls back
    DEV/log.jsonl             what happened to the device, one JSON object per line

Private keys live in ``secure/``; nothing in this class returns one, except to the device's own
TLS stack (:meth:`SimulatedDevice.tls_identity`). A certificate is used with the key it certifies
(found by comparing public keys), so a device provisioned with one key for both certificates (pm
does so) works as before. A device "not capable of generating a CSR" (the paper's Fig. 5) only
exports its public key.

FR3 (seed 003 IX-C, forward secrecy): "After the re-enrollment with CA2, IoT devices will protect
their onward communication using a new key-pair" -- :meth:`SimulatedDevice.generate_pending_key`
makes it, :meth:`SimulatedDevice.install_operational` installs it with CA2's certificate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from iotdlm.c509 import decode_c509, decode_c509_bag, encode_c509, encode_c509_bag
from iotdlm.errors import BadRequestError, ConflictError, NotFoundError, RejectedError, UnsupportedError
from iotdlm.files import atomic_write
from iotdlm.pki.chain import certs_to_pem, load_certificate, load_certificates_pem
from iotdlm.pki.keys import (
    Algorithm,
    PrivateKey,
    PublicKey,
    generate_key,
    hash_for,
    load_private_key_pem,
    private_key_to_pem,
)
from iotdlm.pki.names import check_id

SLOTS = ("slot-a", "slot-b")
#: the device's key files (``secure/<name>.pem``): the device key, the operational key, a new key
#: waiting for its certificate
KEY_FILES = {"device": "key", "operational": "operational", "pending": "pending"}


def bench_device_id(prefix: str, number: int) -> str:
    """The id a device manufactured on the bench gets (``pm bench make``, the demo): PREFIX-00001..."""
    return f"{prefix}-{number:05d}"


#: how a device stores its truststore: PEM files, or one C509 bag (a constrained device)
TRUSTSTORE_FORMATS = ("pem", "c509")
C509_TRUSTSTORE = "truststore.c509"


@dataclass(frozen=True)
class Hardware:
    device_id: str
    dtype: str
    can_make_csr: bool
    algorithm: str
    truststore_format: str = "pem"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _spki(key: object) -> bytes:
    out: bytes = key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return out


def _split_by_format(certs: list[x509.Certificate], fmt: str) -> tuple[list[x509.Certificate], list[bytes]]:
    """(the certificates kept in PEM, the DER of those kept in C509) for a truststore in ``fmt``."""
    if fmt != "c509":
        return list(certs), []
    pem: list[x509.Certificate] = []
    c509: list[bytes] = []
    for cert in certs:
        der = cert.public_bytes(serialization.Encoding.DER)
        try:
            encode_c509(der)
        except RejectedError:
            pem.append(cert)
        else:
            c509.append(der)
    return pem, c509


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, mode=0o644)


class SimulatedDevice:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        hw = self.path / "hardware.json"
        if not hw.is_file():
            raise NotFoundError(f"no simulated device at {self.path} (no hardware.json)")
        data = json.loads(hw.read_text())
        self.hardware = Hardware(
            device_id=data["device_id"],
            dtype=data["dtype"],
            can_make_csr=data["can_make_csr"],
            algorithm=data["algorithm"],
            truststore_format=data.get("truststore_format", "pem"),
        )
        if self.hardware.truststore_format not in TRUSTSTORE_FORMATS:
            raise BadRequestError(f"{hw}: truststore_format must be one of {', '.join(TRUSTSTORE_FORMATS)}")
        #: which key certifies a certificate, per (certificate, key files): see _matching_key
        self._matches: dict[tuple[bytes, tuple[bytes, ...]], str | None] = {}

    # --- manufacturing ----------------------------------------------------------------------
    @classmethod
    def manufacture(
        cls,
        path: Path,
        device_id: str,
        dtype: str,
        *,
        can_make_csr: bool = True,
        algorithm: Algorithm = Algorithm.P256,
        truststore_format: str = "pem",
    ) -> SimulatedDevice:
        """A blank device off the line: an id on its sticker, empty flash (``truststore_format``
        "c509": a constrained device that keeps its truststore in C509)."""
        check_id(device_id)
        check_id(dtype, "dtype")
        path = Path(path)
        if (path / "hardware.json").exists():
            raise ConflictError(f"{path} already holds a device")
        (path / "flash").mkdir(parents=True, exist_ok=True)
        if truststore_format not in TRUSTSTORE_FORMATS:
            raise BadRequestError(f"truststore format must be one of {', '.join(TRUSTSTORE_FORMATS)}")
        hw = {"device_id": device_id, "dtype": dtype, "can_make_csr": can_make_csr, "algorithm": algorithm.value}
        if truststore_format != "pem":
            hw["truststore_format"] = truststore_format
        _atomic_write(path / "hardware.json", json.dumps(hw, indent=2).encode())
        dev = cls(path)
        dev.log("manufactured", dtype=dtype)
        return dev

    @property
    def device_id(self) -> str:
        return self.hardware.device_id

    @property
    def dtype(self) -> str:
        return self.hardware.dtype

    # --- keys: made here, kept here -------------------------------------------------------
    def _key_path(self, name: str = "device") -> Path:
        return self.path / "secure" / f"{KEY_FILES[name]}.pem"

    def has_key(self, name: str = "device") -> bool:
        return self._key_path(name).is_file()

    def generate_key(self) -> PublicKey:
        """Generate the device key pair ON the device (once); return the public key."""
        if self.has_key():
            raise ConflictError(f"device {self.device_id} already has a key pair")
        key = generate_key(Algorithm(self.hardware.algorithm))
        _write_private(self._key_path(), private_key_to_pem(key, None))
        self.log("key_generated", algorithm=self.hardware.algorithm)
        return key.public_key()

    def _key(self, name: str = "device") -> PrivateKey:
        if not self.has_key(name):
            what = "key pair" if name == "device" else f"{name} key"
            raise NotFoundError(f"device {self.device_id} has no {what} yet")
        return load_private_key_pem(self._key_path(name).read_bytes(), None)

    def public_key(self, name: str = "device") -> PublicKey:
        """A public key of the device (the device key unless ``name`` says otherwise), exported
        out of band (the paper's Fig. 5)."""
        return self._key(name).public_key()

    def generate_pending_key(self) -> PublicKey:
        """A NEW key pair, made on the device, for a certificate not issued yet (re-enrollment;
        CA2 in trust transfer: FR3). Replaces (destroys) a pending key left over."""
        if self.has_key("pending"):
            self.destroy_pending_key()
        key = generate_key(Algorithm(self.hardware.algorithm))
        _write_private(self._key_path("pending"), private_key_to_pem(key, None))
        self.log("key_generated", algorithm=self.hardware.algorithm, purpose="pending")
        return key.public_key()

    def destroy_pending_key(self) -> None:
        """The pending key is gone (its request failed, or the transfer rolled back)."""
        path = self._key_path("pending")
        if path.is_file():
            size = path.stat().st_size
            with open(path, "r+b") as f:  # overwrite before unlinking: what a device zeroizes
                f.write(b"\0" * size)
            path.unlink()
            self.log("key_destroyed", purpose="pending")

    def install_operational(self, cert: x509.Certificate) -> None:
        """Install ``cert`` as the operational certificate with the key it certifies: the pending
        key becomes the operational key (the old operational key is gone). The certificate is
        written first, so a crash in between leaves a device whose certificate finds its key;
        repeating the call after a crash finishes the job."""
        wanted = _spki(cert.public_key())
        pending = self.has_key("pending") and _spki(self.public_key("pending")) == wanted
        if not pending and self._matching_key(cert) is None:
            raise ConflictError(
                f"device {self.device_id} holds no key for the certificate {format(cert.serial_number, 'x')}"
            )
        self.write_certificate("operational", cert)
        if pending:
            os.replace(self._key_path("pending"), self._key_path("operational"))
            self.log("key_installed", purpose="operational", serial=format(cert.serial_number, "x"))

    def _matching_key(self, cert: x509.Certificate) -> str | None:
        """Which of the device's keys ``cert`` certifies (None: none of them). Remembered for the
        very same certificate and key files (their bytes), so a device presenting its credential
        on every request parses its keys once, and any change to a key file asks again."""
        names = ("operational", "device", "pending")
        files = tuple(p.read_bytes() if p.is_file() else b"" for p in map(self._key_path, names))
        memo = (cert.public_bytes(serialization.Encoding.DER), files)
        if memo in self._matches:
            return self._matches[memo]
        wanted = _spki(cert.public_key())
        found = None
        for name, pem in zip(names, files, strict=True):
            if pem and _spki(load_private_key_pem(pem, None).public_key()) == wanted:
                found = name
                break
        if len(self._matches) >= 8:
            self._matches.clear()  # a handful of credentials at a time: never grows
        self._matches[memo] = found
        return found

    def _credential_key(self, kind: str) -> str:
        cert = self.certificate(kind)
        if cert is None:
            raise NotFoundError(f"device {self.device_id} has no {kind} certificate")
        name = self._matching_key(cert)
        if name is None:
            raise NotFoundError(f"device {self.device_id} holds no key for its {kind} certificate")
        return name

    def make_csr(self, key: str = "device") -> bytes:
        """A PKCS#10 CSR (DER) signed on the device (the paper's Fig. 4) by its ``key``
        (``device``, or ``pending`` for a new key pair)."""
        if not self.hardware.can_make_csr:
            raise UnsupportedError(f"device {self.device_id} cannot generate a CSR; export its public key instead")
        private = self._key(key)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(private, hash_for(private))
        self.log("csr_made", key=key)
        return csr.public_bytes(serialization.Encoding.DER)

    def sign(self, data: bytes) -> bytes:
        """Sign with the device key (attestation, proofs). The key itself never leaves."""
        from iotdlm.pki.keys import sign_bytes

        return sign_bytes(self._key(), data)

    def est_proof(self, operation: str, nonce: str, csr_der: bytes, *, credential: str | None = None) -> str:
        """The ``Iotdlm-Est-Proof`` header value (ADR 0008): the key of the ``credential`` the
        device presents (default: factory to enroll, operational to re-enroll) signs km's
        ``nonce``, the EST ``operation`` and the public key of the CSR it sends."""
        from iotdlm.pki import est_proof
        from iotdlm.pki.keys import check_public_key

        kind = credential or ("operational" if operation == "simplereenroll" else "factory")
        new_key = check_public_key(x509.load_der_x509_csr(csr_der).public_key())
        self.log("est_proof_made", operation=operation, credential=kind)
        return est_proof.make(self._key(self._credential_key(kind)), operation, nonce, new_key)

    def tls_identity(self, kind: str = "operational") -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for the device's own TLS client (EST): the certificate and the
        key it certifies. The device uses its key itself; this is how the simulated device hands it
        to its TLS stack."""
        cert_path, key_path = self.tls_identity_files(kind)
        return cert_path.read_bytes(), key_path.read_bytes()

    def tls_identity_files(self, kind: str = "operational") -> tuple[Path, Path]:
        """Where the certificate of :meth:`tls_identity` and the key it certifies are (the device's
        own TLS stack loads them from there, with no copy; a certificate kept in C509 is written
        once as PEM to ``DEV/ram/``, the TLS stack taking PEM only)."""
        name = self._credential_key(kind)  # the certificate is there and the device holds its key
        pem = self.path / "flash" / "certs" / f"{kind}.pem"
        if not pem.is_file():  # kept in C509: the TLS stack gets a PEM copy in RAM
            cert = self.certificate(kind)
            assert cert is not None  # _credential_key found it
            pem = self.path / "ram" / f"{kind}.pem"
            data = certs_to_pem([cert])
            if not pem.is_file() or pem.read_bytes() != data:
                _atomic_write(pem, data)
        return pem, self._key_path(name)

    # --- flash ------------------------------------------------------------------------------
    def write_image(self, slot: str, image: Path, info: dict[str, Any]) -> str:
        """Write a software image into a boot slot (streamed); returns its SHA-256."""
        if slot not in SLOTS:
            raise BadRequestError(f"unknown slot {slot!r}; slots are {', '.join(SLOTS)}")
        d = self.path / "flash" / slot
        tmp = d.with_name(slot + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        h = hashlib.sha256()
        with open(image, "rb") as src, open(tmp / "image", "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
        digest = h.hexdigest()
        (tmp / "image.json").write_text(json.dumps({**info, "sha256": digest}, indent=2, sort_keys=True))
        if d.exists():
            shutil.rmtree(d)
        os.replace(tmp, d)
        self.log("image_flashed", slot=slot, sha256=digest, **{k: v for k, v in info.items() if k != "sha256"})
        return digest

    def image_info(self, slot: str = "slot-a") -> dict[str, Any] | None:
        p = self.path / "flash" / slot / "image.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def image_sha256(self, slot: str = "slot-a") -> str | None:
        p = self.path / "flash" / slot / "image"
        if not p.is_file():
            return None
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()

    def write_truststore(self, certs: list[x509.Certificate]) -> None:
        """Install ``certs`` as the truststore: PEM files, or (a C509 device) one C509 bag -- with
        any certificate that has no C509 form kept beside it in PEM."""
        d = self.path / "flash" / "truststore"
        d.mkdir(parents=True, exist_ok=True)
        for old in [*d.glob("*.pem"), *d.glob(C509_TRUSTSTORE)]:
            old.unlink()
        pem, c509 = _split_by_format(certs, self.hardware.truststore_format)
        if c509:
            _atomic_write(d / C509_TRUSTSTORE, encode_c509_bag(c509))
        for i, cert in enumerate(pem):
            _atomic_write(d / f"{i:02d}.pem", certs_to_pem([cert]))
        self.log("truststore_written", count=len(certs), c509=len(c509))

    def truststore(self) -> list[x509.Certificate]:
        """The truststore as certificates (a C509 bag decoded to DER here, at the boundary: the
        device verifies chains with them exactly as with PEM)."""
        d = self.path / "flash" / "truststore"
        out: list[x509.Certificate] = []
        if (d / C509_TRUSTSTORE).is_file():
            out.extend(x509.load_der_x509_certificate(c) for c in decode_c509_bag((d / C509_TRUSTSTORE).read_bytes()))
        for p in sorted(d.glob("*.pem")) if d.is_dir() else []:
            out.extend(load_certificates_pem(p.read_bytes()))
        return out

    def write_certificate(self, kind: str, cert: x509.Certificate) -> None:
        if kind not in ("factory", "operational"):
            raise BadRequestError(f"unknown certificate kind {kind!r}")
        d = self.path / "flash" / "certs"
        _pem, c509 = _split_by_format([cert], self.hardware.truststore_format)
        if c509:
            _atomic_write(d / f"{kind}.c509", encode_c509(c509[0]))
            (d / f"{kind}.pem").unlink(missing_ok=True)
        else:
            _atomic_write(d / f"{kind}.pem", certs_to_pem([cert]))
            (d / f"{kind}.c509").unlink(missing_ok=True)
        self.log("certificate_written", kind=kind, serial=format(cert.serial_number, "x"), c509=bool(c509))

    def certificate(self, kind: str) -> x509.Certificate | None:
        d = self.path / "flash" / "certs"
        if (d / f"{kind}.c509").is_file():
            return x509.load_der_x509_certificate(decode_c509((d / f"{kind}.c509").read_bytes()))
        p = d / f"{kind}.pem"
        return load_certificate(p.read_bytes()) if p.is_file() else None

    def write_config(self, config: dict[str, Any]) -> None:
        _atomic_write(self.path / "flash" / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())
        self.log("config_written", keys=sorted(config))

    def config(self) -> dict[str, Any]:
        p = self.path / "flash" / "config.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    # --- log -------------------------------------------------------------------------------
    def log(self, event: str, **data: Any) -> None:
        line = {"at": dt.datetime.now(dt.UTC).isoformat(), "event": event, **data}
        with open(self.path / "log.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    def events(self) -> list[dict[str, Any]]:
        p = self.path / "log.jsonl"
        if not p.is_file():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
