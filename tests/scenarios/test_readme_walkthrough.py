"""A newcomer follows the README's "Using it" section command by command, as written (issue 14).

The code blocks are read from README.md itself, so the README cannot drift from what works. Each
line runs in bash in a fresh folder with the real ``iotdlm`` entry point on the PATH; the only
substitutions are the README's placeholders: the passphrase (``...``: the one ``init`` generated),
``SERIAL`` (the serial of the certificate issued just before), and the input files a reader
brings (``dev.csr``, ``./csrs``, ``fw.bin``), made here beforehand. A line ending in ``&`` starts in
the background and the next waits until it answers, as a reader would; at the end the
background commands are stopped (``iotdlm down`` if the README lists it, else Ctrl-C), and every
service must be gone. The README's fixed ports must be free, else the test says so and skips.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

import iotdlm

# openssl verify (a README line) checks validity on the machine's real clock
pytestmark = [pytest.mark.real_clock]

README = Path(iotdlm.__file__).resolve().parent.parent.parent / "README.md"
#: the ports the README's commands use: init's defaults (NATS, cm's HTTPS, HTTP and egress) and the repository's
PORTS = (14222, 8443, 8080, 3128)


@dataclass(frozen=True)
class Step:
    command: str
    background: bool


def readme_steps(text: str) -> list[Step]:
    """The commands of the "Using it" section's sh blocks: comments dropped, ``&`` noted."""
    section = text[text.index("## Using it") :]
    section = section[: section.index("\n## ", 1)]
    steps = []
    for block in re.findall(r"```sh\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            command = _strip_comment(line).strip()
            if not command:
                continue
            background = command.endswith("&") and not command.endswith("&&")
            steps.append(Step(command.removesuffix("&").strip() if background else command, background))
    return steps


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` after whitespace, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def test_the_parser_reads_commands_not_comments() -> None:
    text = (
        "## Using it\n\n```sh\niotdlm a --x 1   # note # more\n      # continued note\n"
        "iotdlm up --data d &   # bg\niotdlm b && openssl c\n```\nprose `iotdlm not-a-step`\n\n## Next\n"
    )
    assert readme_steps(text) == [
        Step("iotdlm a --x 1", False),
        Step("iotdlm up --data d", True),
        Step("iotdlm b && openssl c", False),
    ]


@given(st.text(max_size=200))
def test_comment_stripping_keeps_a_prefix(line: str) -> None:
    stripped = _strip_comment(line)
    assert line.startswith(stripped)
    assert _strip_comment(stripped) == stripped


def _port_of(words: list[str]) -> int:
    """The port a background command listens on: its --port, else the default of `repo serve`."""
    if "--port" in words:
        return int(words[words.index("--port") + 1])
    assert words[:3] == ["iotdlm", "repo", "serve"], f"which port does `{' '.join(words)}` answer on?"
    from iotdlm.cli.repository import serve

    (default,) = [p.default for p in serve.params if p.name == "port"]
    assert isinstance(default, int)
    return default


def _free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _answers(port: int) -> bool:
    return not _free(port)


def _make_inputs(folder: Path) -> None:
    """What a reader brings: a device's CSR, a folder of a line's CSRs, a firmware image."""

    def csr(cn: str) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        req = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        )
        return req.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    (folder / "dev.csr").write_bytes(csr("dev-1"))
    (folder / "csrs").mkdir()
    for i in (1, 2, 3):
        (folder / "csrs" / f"line-{i:05d}.csr").write_bytes(csr(f"line-{i:05d}"))
    (folder / "fw.bin").write_bytes(os.urandom(300_000))


class Reader:
    """Runs the steps as a reader at a shell would, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        shim = folder / ".bin"
        shim.mkdir()
        (shim / "iotdlm").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m iotdlm.cli.main "$@"\n')
        (shim / "iotdlm").chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if k not in ("IOTDLM_CA_PASSPHRASE", "IOTDLM_DATA")}
        self.env["PATH"] = f"{shim}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["COLUMNS"] = "200"
        self.background: list[tuple[Step, subprocess.Popen[bytes]]] = []
        self.outputs: dict[str, str] = {}

    def substitute(self, command: str) -> str:
        if "SERIAL" in command:
            cert = x509.load_pem_x509_certificate((self.folder / "dev.pem").read_bytes())
            command = command.replace("SERIAL", f"{cert.serial_number:x}")
        return command

    def run(self, step: Step) -> None:
        command = self.substitute(step.command)
        m = re.fullmatch(r"export (\w+)=(\S+)", command)
        if m:
            value = m.group(2)
            if value == "...":  # the placeholder: the passphrase init generated
                value = (self.folder / "site" / "secrets" / "ca-passphrase").read_text().strip()
            self.env[m.group(1)] = value
            return
        if step.background:
            log = (self.folder / f".bg-{len(self.background)}.log").open("wb")
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command}"], cwd=self.folder, env=self.env, stdout=log, stderr=log
            )
            self.background.append((step, proc))
            self.wait_ready(step, proc)
            return
        done = subprocess.run(
            ["bash", "-c", command], cwd=self.folder, env=self.env, capture_output=True, text=True, timeout=300
        )
        out = done.stdout + done.stderr
        assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{out}\n{self.logs()}"
        assert "Traceback" not in out, out
        self.outputs[step.command] = out

    def wait_ready(self, step: Step, proc: subprocess.Popen[bytes]) -> None:
        """Until the background command answers (a reader waits for its first lines)."""
        words = shlex.split(step.command)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"`{step.command}` exited {proc.returncode}:\n{self.logs()}"
            if words[:2] == ["iotdlm", "up"]:
                data = words[words.index("--data") + 1]
                probe = subprocess.run(
                    ["bash", "-c", f"iotdlm status --data {data}"], cwd=self.folder, env=self.env, capture_output=True
                )
                if probe.returncode == 0:
                    return
            elif _answers(_port_of(words)):
                return
            time.sleep(0.5)
        raise AssertionError(f"`{step.command}` did not answer within 120 s:\n{self.logs()}")

    def logs(self) -> str:
        parts = [p.read_text(errors="replace")[-3000:] for p in sorted(self.folder.glob(".bg-*.log"))]
        parts += [p.read_text(errors="replace")[-3000:] for p in sorted(self.folder.glob("site/logs/*.log"))]
        return "\n---\n".join(parts)

    def stop(self, down: list[Step]) -> None:
        for step in down:
            self.run(step)
        for _step, proc in reversed(self.background):
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # Ctrl-C
        for step, proc in self.background:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"`{step.command}` did not stop on Ctrl-C:\n{self.logs()}") from None


def test_using_it_as_written(tmp_path: Path) -> None:
    steps = readme_steps(README.read_text(encoding="utf-8"))
    ports = [*PORTS]
    for step in steps:
        if step.background and not step.command.startswith("iotdlm up "):
            ports.append(_port_of(shlex.split(step.command)))
    busy = [p for p in ports if not _free(p)]
    if busy:
        pytest.skip(f"the README's commands use fixed ports and {busy} are taken on this machine")
    assert any(s.background and s.command.startswith("iotdlm up ") for s in steps)
    _make_inputs(tmp_path)
    reader = Reader(tmp_path)
    down = [s for s in steps if s.command.startswith("iotdlm down")]  # stops everything: run it last
    try:
        for step in steps:
            if step not in down:
                reader.run(step)
    finally:
        reader.stop(down)
    outputs = "\n".join(reader.outputs.values())
    assert "dev.pem: OK" in outputs  # openssl verify, against the chain the CA wrote
    assert "issued 3, failed 0" in outputs  # the whole line from ./csrs
    assert "reported to the repository" in outputs or "up to date" in outputs  # sm check
    assert "1 stored" in outputs  # sm list: release 7, verified and kept
    assert "mode record: verified" in outputs  # status
    time.sleep(1)
    assert all(_free(p) for p in ports), "a service is still listening after the background commands stopped"
