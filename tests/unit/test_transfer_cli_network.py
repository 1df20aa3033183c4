"""``iotdlm transfer`` over the network (issue 13): what the new options refuse, in words, before
anything is written or sent. The exchange itself: tests/integration/test_transfer_peer.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from iotdlm.cli.transfer import transfer
from iotdlm.clock import SystemClock
from iotdlm.deployment import init_deployment
from iotdlm.pki.chain import certs_to_pem
from iotdlm.pki.keys import Algorithm
from iotdlm.transfer.identity import TransferSettings, create_identity


@pytest.fixture(scope="module")
def sp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sp2") / "d"
    dep, _ = init_deployment(
        root, organization="SP2", algorithm=Algorithm.P256, dtypes=["sensor"], passphrase=b"pw",
        now=SystemClock().now(),
    )  # fmt: skip
    ident = create_identity(dep, TransferSettings(provider_id="sp2"), now=SystemClock().now(), passphrase=b"pw")
    (root / "peer.pem").write_bytes(certs_to_pem([ident.certificate]))
    return root


def refused(*args: str) -> str:
    r = CliRunner().invoke(transfer, list(args))
    assert r.exit_code == 4, r.output
    return " ".join(r.output.split())


def test_export_needs_a_file_or_serve(sp2: Path) -> None:
    out = refused("export", "--data", str(sp2), "--peer-id", "x", "--peer-cert", str(sp2 / "peer.pem"), "--device", "d")
    assert "--out FILE, --serve (cm), or both" in out


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ((), "--out FILE, --send (to SP1's cm), or both"),
        (("--send",), "--from SP1's cm with --transfer"),
        (("--out", "tm.cwt"), "give the UpdateInfoList"),
        (("--from", "https://sp1.example", "--out", "tm.cwt"), "name the transfer (--transfer ID)"),
        (("--from", "https://sp1.example", "--transfer", "nope", "--send"), "32 lower-case hex digits"),
        (("--from", "http://sp1.example", "--transfer", "ab" * 16, "--send"), "over https:// only"),
    ],
)
def test_accept_over_the_network_refuses_in_words(sp2: Path, extra: tuple[str, ...], words: str) -> None:
    base = ("accept", "--data", str(sp2), "--peer-id", "sp1", "--peer-cert", str(sp2 / "peer.pem"))
    assert words in refused(*base, *extra)


def test_confirm_needs_a_file_or_send(sp2: Path) -> None:
    assert "--out FILE, --send SP1's cm, or both" in refused("confirm", "--data", str(sp2), "--transfer", "ab" * 16)
