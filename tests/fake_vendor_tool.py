"""A stand-in for a vendor flashing tool (like Microchip's Libero for PolarFire SoC), driven by
CommandFlasher in tests: it keeps its "devices" as SimulatedDevice folders under --bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from iotdlm.device.simulated import SimulatedDevice
from iotdlm.pki.chain import load_certificate, load_certificates_pem


def main(argv: list[str]) -> int:
    bench, op, *rest = argv
    root = Path(bench)
    if op == "list":
        devices = [{"ref": p.name, "device_id": SimulatedDevice(p).device_id} for p in sorted(root.iterdir())]
        print(json.dumps(devices))
        return 0
    dev = SimulatedDevice(root / rest[0])
    if op == "program":
        image, info = rest[1], json.loads(Path(rest[2]).read_text())
        dev.write_image("slot-a", Path(image), info)
    elif op == "write":
        kind, payload = rest[1], Path(rest[2]).read_bytes()
        if kind == "truststore":
            dev.write_truststore(load_certificates_pem(payload))
        elif kind == "config":
            dev.write_config(json.loads(payload))
        else:
            dev.write_certificate(kind, load_certificate(payload))
    elif op == "pubkey":
        pub = dev.public_key() if dev.has_key() else dev.generate_key()
        sys.stdout.write(
            pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        )
    elif op == "csr":
        if not dev.hardware.can_make_csr:
            return 3
        if not dev.has_key():
            dev.generate_key()
        sys.stdout.buffer.write(dev.make_csr())
    elif op == "sha256":
        print(dev.image_sha256() or "")
    elif op == "fail":
        print("JTAG chain broken", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
