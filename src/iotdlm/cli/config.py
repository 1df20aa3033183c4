"""``iotdlm config``: the configuration reference, generated from the schemas the files are read with.

Every configuration file iotdlm reads is decoded into a msgspec struct (unknown keys refused), so
the struct is the truth about which keys exist, their types and defaults. ``iotdlm config
reference`` walks those structs and writes docs/configuration.md; the ``#:`` comments above each
field in the source are its description. ``--check FILE`` says whether FILE is up to date (a test
runs it, so the reference cannot drift from the schemas).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import msgspec


@dataclass(frozen=True)
class Section:
    """A table of a file: a struct (or dataclass) at ``key`` (``""``: the top level)."""

    key: str
    target: str  # "module:Class"
    note: str = ""


@dataclass(frozen=True)
class ConfigFile:
    path: str
    what: str
    sections: tuple[Section, ...]


FILES: tuple[ConfigFile, ...] = (
    ConfigFile(
        "DIR/iotdlm.toml",
        "The deployment: written by `iotdlm init`, read by every command and service at start "
        "(an unknown key is refused).",
        (
            Section("", "iotdlm.deployment:DeploymentConfig"),
            Section("nats", "iotdlm.deployment:NatsSettings", "how the modules reach NATS"),
            Section("console", "iotdlm.deployment:ConsoleSettings", "the operator console in a browser"),
            Section(
                "profiles.NAME",
                "iotdlm.deployment:ProfileSettings",
                "per certificate profile (factory, operational, service, ocsp, tls-server)",
            ),
            Section("hsm", "iotdlm.hsm.settings:HsmSettings", "CA keys in an HSM over PKCS#11 (`init --ca-key`)"),
        ),
    ),
    ConfigFile(
        "DIR/cm.toml",
        "cm's own settings (optional; the supervisor starts cm with `--data` only). Flags of "
        "`iotdlm cm serve` win over the file; `iotdlm sm setup` adds the repository to `allow_origins`.",
        (
            Section("", "iotdlm.cm.config:CmFile"),
            Section("limits", "iotdlm.cm.config:Limits", "what one client may cost cm"),
        ),
    ),
    ConfigFile(
        "DIR/sm/config.toml",
        "sm: written by `iotdlm sm setup` (run it again to change a setting).",
        (Section("", "iotdlm.sm.config:SmConfig"),),
    ),
    ConfigFile(
        "DIR/pm/TYPE/config.toml",
        "pm for one device type: written by `iotdlm pm setup --dtype TYPE` (unchanged fields are kept).",
        (Section("", "iotdlm.pm.config:PmConfig"),),
    ),
    ConfigFile(
        "DIR/transfer/transfer.toml",
        "Trust transfer: written by `iotdlm transfer init`.",
        (Section("", "iotdlm.transfer.identity:TransferSettings"),),
    ),
    ConfigFile(
        "REPO/repo.toml",
        "The vendor's repository (`iotdlm repo`): written by `repo init`; change it with `repo expiry`, "
        "`repo trust`, not by hand.",
        (Section("", "iotdlm.repository.storage:Settings"),),
    ),
)

#: descriptions of the fields whose schema carries no ``#:`` comment (class name, field) -> words;
#: a test fails when a key has neither
DESCRIPTIONS: dict[tuple[str, str], str] = {
    ("DeploymentConfig", "organization"): "the organization (O=) in every name the CAs issue",
    ("DeploymentConfig", "algorithm"): "key algorithm of the CAs and module identities "
    "(ecdsa-p256, ecdsa-p384, ed25519, rsa-3072); fixed at init",
    ("DeploymentConfig", "public_url"): "where cm serves OCSP and CRLs, written into every certificate "
    "(CRL distribution points, OCSP); cm's HTTPS certificate names its host",
    ("DeploymentConfig", "dtypes"): "the device types this deployment provisions (one pm identity each)",
    ("DeploymentConfig", "database_url"): "SQLAlchemy URL of the store (postgresql+psycopg://...); "
    "not set: SQLite at DIR/db/iotdlm.db",
    ("DeploymentConfig", "passphrase_file"): "file holding the CA keys' passphrase; not set: "
    "$IOTDLM_CA_PASSPHRASE, else DIR/secrets/ca-passphrase",
    ("DeploymentConfig", "request_window_seconds"): "how old (or how far ahead) a signed request to km "
    "may be, in seconds; a replayed one is refused within it",
    ("DeploymentConfig", "nats"): "the `[nats]` table below",
    ("DeploymentConfig", "profiles"): "per-profile settings: the `[profiles.NAME]` tables below",
    ("NatsSettings", "host"): "address of the embedded NATS server",
    ("NatsSettings", "port"): "port of the embedded NATS server",
    ("NatsSettings", "tls"): "NATS over TLS; every module also presents its certificate (`init --nats-tls`)",
    ("ProfileSettings", "validity_days"): "validity of certificates of this profile, in days "
    "(not set: the profile's default)",
    ("CmFile", "host"): "address of the HTTPS and HTTP listeners (default 127.0.0.1)",
    ("CmFile", "https_port"): "EST, OCSP, CRLs and the transfer routes over HTTPS (default 8443)",
    ("CmFile", "http_port"): "OCSP and CRLs over plain HTTP (default 8080)",
    ("CmFile", "http"): "false: no plain-HTTP listener (OCSP and CRLs over HTTPS only)",
    ("CmFile", "egress_host"): "address of sm's egress proxy (default 127.0.0.1)",
    ("CmFile", "egress_port"): "port of sm's egress proxy (default 3128)",
    ("CmFile", "allow_origins"): "repository origins (scheme://host[:port]) sm may reach through the "
    "egress proxy; empty: no egress proxy",
    ("CmFile", "tls_key"): "the unencrypted PEM key of `tls_cert`",
    ("CmFile", "limits"): "the `[limits]` table below",
    ("Limits", "max_field_size"): "largest request header field aiohttp accepts",
    ("Limits", "max_headers"): "most request header fields",
    ("SmConfig", "repository_url"): "base URL of the vendor repository (http:// or https://)",
    ("SmConfig", "dtypes"): "the device types sm manages",
    ("SmConfig", "ca_bundle"): "PEM CAs that may sign the repository's TLS certificate (not set: the system store)",
    ("SmConfig", "poll_interval_seconds"): "seconds between checks of each device type; a check that "
    "could not reach the repository is tried again sooner",
    ("SmConfig", "max_image_bytes"): "refuse images larger than this",
    ("PmConfig", "batch_size"): "devices per request to km (1..1000)",
    ("PmConfig", "concurrency"): "devices provisioned at once (1..256)",
    ("Settings", "format"): "version of this file's format",
    ("Settings", "algorithm"): "key algorithm of the roles' keys",
    ("Settings", "thresholds"): "signatures each role needs (role -> N)",
    ("Settings", "keys_per_role"): "keys each role has (role -> N)",
    ("Settings", "expiry_seconds"): "how long each role's metadata is valid after signing (role -> seconds)",
    ("Settings", "report_ca"): "file inside REPO of the CAs whose certificates may sign sm's download "
    "reports (`repo init --report-ca`, `repo trust`)",
}

HEADER = """# Configuration reference

Every key of every configuration file iotdlm reads, with its type and default. Generated from the
schemas the files are decoded with (msgspec structs: an unknown key is refused, a wrong type named)
by `iotdlm config reference --out docs/configuration.md`; `tests/unit/test_configuration_reference.py`
fails when this page and the schemas differ. `DIR` is the deployment folder (`--data`).

Logging is not a file setting: `iotdlm --log-format json ...` (or `IOTDLM_LOG_FORMAT=json`, which
the services `iotdlm up` starts inherit) writes one JSON object per log line.
"""


def _load(target: str) -> type:
    module, name = target.split(":")
    obj = getattr(importlib.import_module(module), name)
    assert isinstance(obj, type)
    return obj


_FIELD = re.compile(r"^\s{4}(\w+)\s*:\s*[^=]+?(?:=.*?)?(?:#\s*(?P<trailing>.*))?$")


def field_comments(cls: type) -> dict[str, str]:
    """Each field's description: the ``#:`` lines just above it, or a comment after it."""
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in textwrap.dedent(inspect.getsource(cls)).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        m = _FIELD.match(line)
        if m and not stripped.startswith(("def ", "@", "#")) and line.startswith("    ") and line[4] != " ":
            trailing = (m.group("trailing") or "").strip()
            note = " ".join(pending) or trailing
            if "noqa" in note:
                note = ""
            out[m.group(1)] = note
        pending = []
    return out


def type_name(t: Any) -> str:
    """A field's type in words a TOML author reads."""
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = " or ".join(type_name(a) for a in rest)
        return f"{inner} (optional)" if len(rest) < len(args) else inner
    if origin is list or origin is tuple:
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"table of {type_name(args[1])}" if args else "table"
    if t is Path:
        return "path"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    if t in names:
        return names[t]
    if isinstance(t, type) and issubclass(t, msgspec.Struct):
        return "table"
    if isinstance(t, type) and hasattr(t, "__members__"):  # an Enum
        return " | ".join(repr(m.value) for m in t.__members__.values())
    return getattr(t, "__name__", str(t))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, msgspec.Struct):
        return "(the table below)"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    if hasattr(value, "value"):  # an Enum
        return _toml_value(value.value)
    return str(value)


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    description: str


def rows(cls: type) -> list[Row]:
    """One row per field of a msgspec struct or a dataclass, in declaration order."""
    notes = field_comments(cls)
    out: list[Row] = []
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        for f in msgspec.structs.fields(cls):
            if f.required:
                default = "required"
            else:
                value = f.default_factory() if f.default is msgspec.NODEFAULT else f.default
                default = "not set" if value is None else _toml_value(value)
            note = notes.get(f.name) or DESCRIPTIONS.get((cls.__name__, f.name), "")
            out.append(Row(f.encode_name, type_name(f.type), default, note))
        return out
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is neither a msgspec struct nor a dataclass")  # a wrong FILES entry
    hints = typing.get_type_hints(cls)
    for d in dataclasses.fields(cls):
        if d.default is not dataclasses.MISSING:
            default = "not set" if d.default is None else _toml_value(d.default)
        elif d.default_factory is not dataclasses.MISSING:
            default = _toml_value(d.default_factory())
        else:
            default = "required"
        note = notes.get(d.name) or DESCRIPTIONS.get((cls.__name__, d.name), "")
        out.append(Row(d.name, type_name(hints[d.name]), default, note))
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _doc_first_paragraph(cls: type) -> str:
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")  # its own, not msgspec.Struct's
    first = doc.split("\n\n")[0].replace("``", "`")
    return " ".join(first.split()) if "::" not in first else ""


def reference() -> str:
    """docs/configuration.md, from the schemas."""
    parts = [HEADER]
    for file in FILES:
        parts.append(f"## `{file.path}`\n\n{file.what}\n")
        for section in file.sections:
            cls = _load(section.target)
            heading = f"`[{section.key}]`" if section.key else "top level"
            note = f": {section.note}" if section.note else ""
            parts.append(f"### {heading}{note}\n")
            doc = _doc_first_paragraph(cls)
            if doc:
                parts.append(f"{doc}\n")
            table = ["| key | type | default | what |", "|---|---|---|---|"]
            table += [
                f"| `{r.key}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.description)} |" for r in rows(cls)
            ]
            parts.append("\n".join(table) + "\n")
    return "\n".join(parts)


@click.group("config", context_settings={"help_option_names": ["-h", "--help"]})
def config() -> None:
    """Configuration files: every key, its type and default (docs/configuration.md)."""


@config.command("reference")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Write the reference (Markdown) to this file instead of printing it.",
)
@click.option(
    "--check",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="Only say whether this file is the reference as generated now (exit 1 if not).",
)
def reference_cmd(out: Path | None, check: Path | None) -> None:
    """Every key of iotdlm.toml, cm.toml, sm's, pm's, the transfer's and the vendor repository's
    configuration, generated from the schemas the files are read with."""
    text = reference()
    if check is not None:
        if check.read_text(encoding="utf-8") != text:
            click.echo(
                f"{check} differs from the configuration schemas: run `iotdlm config reference --out {check}`",
                err=True,
            )
            sys.exit(1)
        click.echo(f"{check} is up to date")
        return
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror}") from None
    click.echo(f"wrote {out}")


__all__ = ["config", "reference"]
