"""sm's configuration in a deployment folder: what setup writes, what it refuses, what it keeps."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from iotdlm.clock import SystemClock
from iotdlm.errors import BadRequestError, NotFoundError
from iotdlm.repository import VendorRepository
from iotdlm.sm import config as smconfig

NOW = SystemClock().now()


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    tmp = tmp_path_factory.mktemp("roots")
    return (
        VendorRepository.init(tmp / "a", now=NOW).trusted_root(),
        VendorRepository.init(tmp / "b", now=NOW).trusted_root(),
    )


def test_setup_writes_config_pinned_root_and_a_private_key(tmp_path: Path, roots: tuple[bytes, bytes]) -> None:
    cfg = smconfig.setup(
        tmp_path,
        repository_url="https://repo.example/",
        root=roots[0],
        dtypes=["boardB", "boardA", "boardA"],
        egress_proxy="http://127.0.0.1:3128",
    )
    assert cfg.repository_url == "https://repo.example"
    assert cfg.dtypes == ["boardA", "boardB"]
    assert smconfig.load_config(tmp_path) == cfg
    assert (
        msgspec.toml.decode((tmp_path / "sm" / "config.toml").read_bytes())["egress_proxy"] == "http://127.0.0.1:3128"
    )
    assert smconfig.load_trusted_root(tmp_path) == roots[0]
    key = smconfig.key_path(tmp_path)
    assert key.stat().st_mode & 0o777 == 0o600
    assert len(smconfig.load_meta_key(tmp_path)) == 32
    assert smconfig.fetcher_for(cfg).proxy_url == "http://127.0.0.1:3128"


def test_setup_again_keeps_the_key_and_drops_a_cache_verified_from_another_root(
    tmp_path: Path, roots: tuple[bytes, bytes]
) -> None:
    smconfig.setup(tmp_path, repository_url="http://127.0.0.1:1", root=roots[0], dtypes=["boardA"])
    key = smconfig.load_meta_key(tmp_path)
    cache = tmp_path / "sm" / "_tuf"
    cache.mkdir()
    (cache / "timestamp.json").write_text("{}")
    smconfig.setup(tmp_path, repository_url="http://127.0.0.1:1", root=roots[0], dtypes=["boardA"])
    assert cache.exists()  # same anchor: the cache stays
    smconfig.setup(tmp_path, repository_url="http://127.0.0.1:1", root=roots[1], dtypes=["boardA"])
    assert not cache.exists()
    assert smconfig.load_meta_key(tmp_path) == key


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"repository_url": "ftp://repo"}, "repository_url"),
        ({"dtypes": ["../x"]}, "dtype"),
        ({"dtypes": ["config.toml"]}, "dtype"),
        ({"egress_proxy": "https://proxy:3128"}, "egress_proxy"),
        ({"poll_interval_seconds": 0}, "poll_interval_seconds"),
        ({"max_image_bytes": 0}, "max_image_bytes"),
        ({"root": b"{}"}, "root"),
    ],
)
def test_setup_refuses(tmp_path: Path, roots: tuple[bytes, bytes], kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"repository_url": "http://127.0.0.1:1", "root": roots[0], "dtypes": ["boardA"]}
    args.update(kwargs)
    with pytest.raises(BadRequestError) as info:
        smconfig.setup(tmp_path, **args)
    assert info.value.field == field
    assert not (tmp_path / "sm" / "config.toml").exists()


def test_missing_pieces_say_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="iotdlm sm setup"):
        smconfig.load_config(tmp_path)
    with pytest.raises(NotFoundError, match="iotdlm sm setup"):
        smconfig.load_meta_key(tmp_path)
    (tmp_path / "secrets").mkdir()
    smconfig.key_path(tmp_path).write_bytes(b"short")
    with pytest.raises(BadRequestError, match="exactly 32 bytes"):
        smconfig.load_meta_key(tmp_path)
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "config.toml").write_text('repository_url = "http://x"\ndtypes = ["boardA"]\nbogus = 1\n')
    with pytest.raises(BadRequestError, match="bogus"):
        smconfig.load_config(tmp_path)
