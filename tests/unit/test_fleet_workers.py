"""How ``fleet run --workers`` splits a fleet: every device in exactly one worker, small fleets in
one process, never more workers than cores; and a device's HTTPS contexts follow its credential."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from iotdlm.cli.fleet_workers import DEVICES_PER_WORKER, default_workers, share
from iotdlm.errors import NotFoundError
from iotdlm.pki.keys import Algorithm, generate_key, private_key_to_pem
from iotdlm.transfer.http_clients import DeviceHttps
from tests.unit.test_transfer_agent import make_device


@given(st.integers(min_value=0, max_value=500), st.integers(min_value=1, max_value=64))
def test_every_device_is_in_exactly_one_worker(count: int, workers: int) -> None:
    paths = [Path(f"fleet/sim-{i:04d}") for i in range(count)]
    shares = share(paths, workers)
    flat = [p for s in shares for p in s]
    assert sorted(flat) == paths
    assert len(shares) == max(1, min(workers, count))
    if count:
        assert all(shares)  # no worker without devices
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize(
    ("count", "cpus", "wanted"),
    [
        (1, 8, 1),
        (DEVICES_PER_WORKER, 8, 1),
        (DEVICES_PER_WORKER + 1, 8, 2),
        (10_000, 2, 2),
        (10_000, 1, 1),
        (350, 16, 4),
    ],
)
def test_default_workers(count: int, cpus: int, wanted: int) -> None:
    assert default_workers(count, cpus) == wanted


async def test_a_pass_keeps_one_session_per_credential_and_drops_them_at_its_end(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    https = DeviceHttps(dev, timeout=5.0)
    anchors = dev.truststore()
    factory = dev.tls_identity("factory")
    operational = dev.tls_identity("operational")
    s1 = https._session_for(anchors, *factory)
    assert https._session_for(anchors, *factory) is s1  # reused within the pass
    s2 = https._session_for(anchors, *operational)
    assert s2 is not s1  # another credential: another TLS context and connection
    s3 = https._session_for(anchors[:1], *factory)
    assert s3 not in (s1, s2)  # other anchors: another server check, another connection
    await https.close()
    assert s1.closed
    assert s2.closed
    assert s3.closed
    again = https._session_for(anchors, *factory)
    assert again is not s1
    assert not again.closed
    await https.close()


def test_the_key_a_certificate_uses_is_asked_again_when_a_key_file_changes(tmp_path: Path) -> None:
    dev = make_device(tmp_path)
    cert_path, key_path = dev.tls_identity_files("factory")
    assert key_path == dev.path / "secure" / "key.pem"
    assert dev.tls_identity_files("factory") == (cert_path, key_path)  # remembered: same files, same answer
    key_path.write_bytes(private_key_to_pem(generate_key(Algorithm.P256), None))  # the key is not that one now
    with pytest.raises(NotFoundError, match="holds no key for its factory certificate"):
        dev.tls_identity_files("factory")
