"""A simulated device whose flash is a folder.

Layout of a device folder::

    DEV/hardware.json         what the hardware is (device id from the "sticker", dtype, capabilities)
    DEV/flash/slot-a/         boot image slots: image + image.json
    DEV/flash/slot-b/
    DEV/flash/truststore/     CA certificates (PEM), installed by provisioning
    DEV/flash/certs/          the device's certificates: factory.pem, operational.pem
    DEV/flash/config.json     device id, dtype, enroll URI (CA-URI), update URI, ...
    DEV/secure/key.pem        the device's private key: generated ON the device, never read out
    DEV/log.jsonl             what happened to the device, one JSON object per line

The private key lives in ``secure/``; nothing in this class returns it. A device "not capable of
generating a CSR" (the paper's Fig. 5) only exports its public key.
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

from iotdlm.errors import BadRequestError, ConflictError, NotFoundError, UnsupportedError
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


@dataclass(frozen=True)
class Hardware:
    device_id: str
    dtype: str
    can_make_csr: bool
    algorithm: str


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


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
        )

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
    ) -> SimulatedDevice:
        """A blank device off the line: an id on its sticker, empty flash."""
        check_id(device_id)
        check_id(dtype, "dtype")
        path = Path(path)
        if (path / "hardware.json").exists():
            raise ConflictError(f"{path} already holds a device")
        (path / "flash").mkdir(parents=True, exist_ok=True)
        hw = {"device_id": device_id, "dtype": dtype, "can_make_csr": can_make_csr, "algorithm": algorithm.value}
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
    def _key_path(self) -> Path:
        return self.path / "secure" / "key.pem"

    def has_key(self) -> bool:
        return self._key_path().is_file()

    def generate_key(self) -> PublicKey:
        """Generate the device key pair ON the device (once); return the public key."""
        if self.has_key():
            raise ConflictError(f"device {self.device_id} already has a key pair")
        key = generate_key(Algorithm(self.hardware.algorithm))
        _write_private(self._key_path(), private_key_to_pem(key, None))
        self.log("key_generated", algorithm=self.hardware.algorithm)
        return key.public_key()

    def _key(self) -> PrivateKey:
        if not self.has_key():
            raise NotFoundError(f"device {self.device_id} has no key pair yet")
        return load_private_key_pem(self._key_path().read_bytes(), None)

    def public_key(self) -> PublicKey:
        """The device public key, exported out of band (the paper's Fig. 5)."""
        return self._key().public_key()

    def make_csr(self) -> bytes:
        """A PKCS#10 CSR (DER) signed on the device (the paper's Fig. 4)."""
        if not self.hardware.can_make_csr:
            raise UnsupportedError(f"device {self.device_id} cannot generate a CSR; export its public key instead")
        key = self._key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.device_id)])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hash_for(key))
        self.log("csr_made")
        return csr.public_bytes(serialization.Encoding.DER)

    def sign(self, data: bytes) -> bytes:
        """Sign with the device key (attestation, proofs). The key itself never leaves."""
        from iotdlm.pki.keys import sign_bytes

        return sign_bytes(self._key(), data)

    def est_proof(self, operation: str, nonce: str, csr_der: bytes) -> str:
        """The ``Iotdlm-Est-Proof`` header value (ADR 0008): the device key signs km's ``nonce``,
        the EST ``operation`` and the public key of the CSR it sends."""
        from iotdlm.pki import est_proof
        from iotdlm.pki.keys import check_public_key

        new_key = check_public_key(x509.load_der_x509_csr(csr_der).public_key())
        self.log("est_proof_made", operation=operation)
        return est_proof.make(self._key(), operation, nonce, new_key)

    def tls_identity(self, kind: str = "operational") -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for the device's own TLS client (EST): the device uses its key
        itself; this is how the simulated device hands it to its TLS stack."""
        cert = self.certificate(kind)
        if cert is None:
            raise NotFoundError(f"device {self.device_id} has no {kind} certificate")
        return certs_to_pem([cert]), self._key_path().read_bytes()

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
        d = self.path / "flash" / "truststore"
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.pem"):
            old.unlink()
        for i, cert in enumerate(certs):
            _atomic_write(d / f"{i:02d}.pem", certs_to_pem([cert]))
        self.log("truststore_written", count=len(certs))

    def truststore(self) -> list[x509.Certificate]:
        d = self.path / "flash" / "truststore"
        out: list[x509.Certificate] = []
        for p in sorted(d.glob("*.pem")) if d.is_dir() else []:
            out.extend(load_certificates_pem(p.read_bytes()))
        return out

    def write_certificate(self, kind: str, cert: x509.Certificate) -> None:
        if kind not in ("factory", "operational"):
            raise BadRequestError(f"unknown certificate kind {kind!r}")
        _atomic_write(self.path / "flash" / "certs" / f"{kind}.pem", certs_to_pem([cert]))
        self.log("certificate_written", kind=kind, serial=format(cert.serial_number, "x"))

    def certificate(self, kind: str) -> x509.Certificate | None:
        p = self.path / "flash" / "certs" / f"{kind}.pem"
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
