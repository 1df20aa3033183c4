"""A SoftHSM2 token of its own for each test session: ``SOFTHSM2_CONF`` points at a temporary folder
(set before python-pkcs11 first loads the library in this process, which reads it once), and
``softhsm2-util --init-token --free`` makes a token there with a known user PIN."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN = "iotdlm-test"
PIN = "24681357"

needs_softhsm = pytest.mark.skipif(
    not (Path(SOFTHSM_MODULE).is_file() and shutil.which("softhsm2-util")),
    reason="SoftHSM2 is not installed (Debian package softhsm2; `make sysdeps` installs it)",
)


@dataclass(frozen=True)
class SoftHsm:
    module: str
    token: str
    pin_file: Path

    def uri(self, prefix: str) -> str:
        """What an operator passes to ``iotdlm init --ca-key``."""
        return f"pkcs11:token={self.token};object={prefix}?module-path={self.module}"


def make_token(root: Path) -> SoftHsm:
    """A token in ``root/tokens`` with its ``SOFTHSM2_CONF`` set in this process's environment (and
    so in every process it starts: they share the token, as hosts share a network HSM)."""
    (root / "tokens").mkdir(parents=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {root / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", TOKEN, "--pin", PIN, "--so-pin", "13572468"],
        check=True,
        capture_output=True,
    )
    pin_file = root / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    return SoftHsm(module=SOFTHSM_MODULE, token=TOKEN, pin_file=pin_file)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    before = os.environ.get("SOFTHSM2_CONF")
    hsm = make_token(tmp_path_factory.mktemp("softhsm"))
    try:
        yield hsm
    finally:
        if before is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = before
