"""Flasher plug-ins: how pm reaches the devices on the bench, one plug-in per device type.

The paper containerised the vendor's tool (Microchip Libero for PolarFire SoC); here a plug-in is
a small class behind :class:`Flasher`. Two are shipped:

- :class:`SimulatedFlasher` -- devices are folders (:class:`iotdlm.device.simulated.SimulatedDevice`);
- :class:`CommandFlasher` -- drives an external vendor tool through command templates.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from iotdlm.device.simulated import SimulatedDevice
from iotdlm.errors import BadRequestError, UnavailableError, UnsupportedError
from iotdlm.pki.chain import certs_to_pem, load_certificate, load_certificates_pem
from iotdlm.pki.keys import PublicKey, load_public_key


@dataclass(frozen=True)
class DeviceOnBench:
    ref: str  # how the flasher addresses it (a folder, a USB port, a JTAG chain position)
    device_id: str  # read off the device (sticker, QR code, programming port)
    dtype: str


class Flasher(Protocol):
    dtype: str

    def discover(self) -> list[DeviceOnBench]: ...

    def flash_image(self, ref: str, image: Path, info: Mapping[str, Any]) -> None: ...

    def flash_truststore(self, ref: str, certs: Sequence[x509.Certificate]) -> None: ...

    def flash_certificate(self, ref: str, kind: str, cert: x509.Certificate) -> None: ...

    def flash_config(self, ref: str, config: Mapping[str, Any]) -> None: ...

    def device_public_key(self, ref: str) -> PublicKey:
        """The device's public key (it generates its key pair first if it has none)."""
        ...

    def device_csr(self, ref: str) -> bytes | None:
        """A CSR made on the device, or None when the device cannot make one."""
        ...

    def read_image_sha256(self, ref: str) -> str | None: ...

    def read_truststore(self, ref: str) -> list[x509.Certificate]:
        """The CA certificates in the device's truststore, read back from the device."""
        ...

    def read_certificate(self, ref: str, kind: str) -> x509.Certificate | None:
        """The device's ``kind`` (factory | operational) certificate, read back; None if it has none."""
        ...


class SimulatedFlasher:
    """Devices are folders under ``bench`` (each made by ``SimulatedDevice.manufacture``)."""

    def __init__(self, bench: Path, dtype: str) -> None:
        self.bench = Path(bench)
        self.dtype = dtype

    def _dev(self, ref: str) -> SimulatedDevice:
        path = Path(ref)
        if not path.is_absolute():
            path = self.bench / ref
        return SimulatedDevice(path)

    def discover(self) -> list[DeviceOnBench]:
        out = []
        for p in sorted(self.bench.iterdir()) if self.bench.is_dir() else []:
            if (p / "hardware.json").is_file():
                dev = SimulatedDevice(p)
                if dev.dtype == self.dtype:
                    out.append(DeviceOnBench(ref=str(p), device_id=dev.device_id, dtype=dev.dtype))
        return out

    def flash_image(self, ref: str, image: Path, info: Mapping[str, Any]) -> None:
        self._dev(ref).write_image("slot-a", image, dict(info))

    def flash_truststore(self, ref: str, certs: Sequence[x509.Certificate]) -> None:
        self._dev(ref).write_truststore(list(certs))

    def flash_certificate(self, ref: str, kind: str, cert: x509.Certificate) -> None:
        self._dev(ref).write_certificate(kind, cert)

    def flash_config(self, ref: str, config: Mapping[str, Any]) -> None:
        self._dev(ref).write_config(dict(config))

    def device_public_key(self, ref: str) -> PublicKey:
        dev = self._dev(ref)
        return dev.public_key() if dev.has_key() else dev.generate_key()

    def device_csr(self, ref: str) -> bytes | None:
        dev = self._dev(ref)
        if not dev.hardware.can_make_csr:
            return None
        if not dev.has_key():
            dev.generate_key()
        return dev.make_csr()

    def read_image_sha256(self, ref: str) -> str | None:
        return self._dev(ref).image_sha256()

    def read_truststore(self, ref: str) -> list[x509.Certificate]:
        return self._dev(ref).truststore()

    def read_certificate(self, ref: str, kind: str) -> x509.Certificate | None:
        return self._dev(ref).certificate(kind)


class CommandFlasher:
    """Drives an external vendor tool. ``commands`` maps an operation to an argv template; fields
    ``{device}``, ``{image}``, ``{file}``, ``{kind}`` are substituted (never through a shell):

    - ``discover``      -> stdout: JSON list of {"ref", "device_id"}
    - ``flash_image``   -> uses {device} {image} {file} (file: JSON with the image info)
    - ``flash_file``    -> uses {device} {kind} {file} (kind: truststore | factory | operational | config)
    - ``public_key``    -> stdout: PEM public key
    - ``csr``           -> stdout: PEM or DER CSR; exit code 3 means "this device cannot make CSRs"
    - ``image_sha256``  -> stdout: hex digest
    - ``read_file``     -> optional; uses {device} {kind} (truststore | factory | operational);
      stdout: the PEM read back from the device, empty if there is none. Without it, pm cannot
      verify what it flashed and reports every device as failed at its ``verify`` step.
    """

    OPERATIONS = ("discover", "flash_image", "flash_file", "public_key", "csr", "image_sha256")
    OPTIONAL = ("read_file",)

    def __init__(self, dtype: str, commands: Mapping[str, Sequence[str]], *, timeout: float = 600.0) -> None:
        missing = [op for op in self.OPERATIONS if op not in commands]
        if missing:
            raise BadRequestError(f"command flasher for {dtype} lacks templates for: {', '.join(missing)}")
        self.dtype = dtype
        self.commands = {k: list(v) for k, v in commands.items()}
        self.timeout = timeout

    @classmethod
    def from_config(cls, dtype: str, path: Path) -> CommandFlasher:
        """Templates from a JSON file: {"discover": ["tool", "list"], ...} (strings are split like a shell)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise BadRequestError(f"flasher config {path}: {exc}") from exc
        commands = {k: shlex.split(v) if isinstance(v, str) else list(v) for k, v in raw.items()}
        return cls(dtype, commands)

    def _run(
        self, op: str, fields: dict[str, str] | None = None, *, ok_codes: tuple[int, ...] = (0,)
    ) -> subprocess.CompletedProcess[bytes]:
        argv = [part.format(**(fields or {})) for part in self.commands[op]]
        try:
            proc = subprocess.run(argv, capture_output=True, timeout=self.timeout, check=False)  # noqa: S603
        except FileNotFoundError as exc:
            raise UnavailableError(f"flasher tool {argv[0]!r} for {self.dtype} is not installed") from exc
        except subprocess.TimeoutExpired as exc:
            raise UnavailableError(f"flasher tool timed out after {self.timeout:.0f} s: {op}") from exc
        if proc.returncode not in ok_codes:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise UnavailableError(f"flasher tool failed ({op}, exit {proc.returncode}): {tail[0]}")
        return proc

    def _with_file(self, op: str, data: bytes, **fields: str) -> None:
        with tempfile.TemporaryDirectory(prefix="iotdlm-flash-") as tmp:
            f = Path(tmp) / "payload"
            f.write_bytes(data)
            self._run(op, {"file": str(f), **fields})

    def discover(self) -> list[DeviceOnBench]:
        out = self._run("discover").stdout
        try:
            items = json.loads(out)
            return [DeviceOnBench(ref=str(i["ref"]), device_id=str(i["device_id"]), dtype=self.dtype) for i in items]
        except (ValueError, KeyError, TypeError) as exc:
            raise BadRequestError(f"flasher tool's discover output is not a JSON device list: {exc}") from exc

    def flash_image(self, ref: str, image: Path, info: Mapping[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="iotdlm-flash-") as tmp:
            f = Path(tmp) / "info.json"
            f.write_text(json.dumps(dict(info), sort_keys=True))
            self._run("flash_image", {"device": ref, "image": str(image), "file": str(f)})

    def flash_truststore(self, ref: str, certs: Sequence[x509.Certificate]) -> None:
        self._with_file("flash_file", certs_to_pem(certs), device=ref, kind="truststore")

    def flash_certificate(self, ref: str, kind: str, cert: x509.Certificate) -> None:
        self._with_file("flash_file", certs_to_pem([cert]), device=ref, kind=kind)

    def flash_config(self, ref: str, config: Mapping[str, Any]) -> None:
        self._with_file("flash_file", json.dumps(dict(config), sort_keys=True).encode(), device=ref, kind="config")

    def device_public_key(self, ref: str) -> PublicKey:
        return load_public_key(self._run("public_key", {"device": ref}).stdout)

    def device_csr(self, ref: str) -> bytes | None:
        proc = self._run("csr", {"device": ref}, ok_codes=(0, 3))
        return None if proc.returncode == 3 else proc.stdout

    def read_image_sha256(self, ref: str) -> str | None:
        out = self._run("image_sha256", {"device": ref}).stdout.decode().strip()
        return out or None

    def _read_file(self, ref: str, kind: str) -> bytes:
        if "read_file" not in self.commands:
            raise UnsupportedError(
                f"the command flasher for {self.dtype} has no read_file template: pm cannot read back "
                "what it flashed to verify it; add one to the flasher config"
            )
        return self._run("read_file", {"device": ref, "kind": kind}).stdout

    def read_truststore(self, ref: str) -> list[x509.Certificate]:
        out = self._read_file(ref, "truststore")
        return load_certificates_pem(out) if out.strip() else []

    def read_certificate(self, ref: str, kind: str) -> x509.Certificate | None:
        out = self._read_file(ref, kind)
        return load_certificate(out) if out.strip() else None
