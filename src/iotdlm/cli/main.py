"""``iotdlm``: set up a deployment, run its services, operate its CA.

The root group only: each command group lives in its own module of this package and is imported
when it runs (see :mod:`iotdlm.cli.lazy`), so ``iotdlm --help`` costs little more than importing
click. Run as ``iotdlm`` or ``python -m iotdlm.cli.main`` (how the modes supervisor starts services).
"""

from __future__ import annotations

import logging
import os

import click

from iotdlm import __version__
from iotdlm.cli.lazy import Lazy, LazyGroup

#: name -> where the command lives and the help ``iotdlm --help`` shows for it.
COMMANDS: dict[str, Lazy] = {
    "init": Lazy(
        "iotdlm.cli.init:init", "Create a deployment: root and issuing CAs, module identities, NATS credentials."
    ),
    "nats": Lazy(
        "iotdlm.cli.nats_server:nats",
        "The embedded NATS server (loopback only, one user per module), and a NATS cluster's route certificates.",
    ),
    "km": Lazy(
        "iotdlm.cli.km:km",
        "km: certificate, registration and validation authority (issue, refuse, revoke; CRLs and OCSP).",
    ),
    "ca": Lazy("iotdlm.cli.ca:ca", "Operate the CA directly from the data folder (the operator's tools)."),
    "device": Lazy(
        "iotdlm.cli.device:device",
        "Device lifecycle: revoke a device's certificates, decommission it, or run a simulated device.",
    ),
    "fleet": Lazy(
        "iotdlm.cli.fleet:fleet",
        "A fleet of simulated devices on the network: enrollment, re-enrollment, trust transfer.",
    ),
    "va": Lazy("iotdlm.cli.va:va", "Validation authority: ask for a certificate's status as a relying party would."),
    "audit": Lazy(
        "iotdlm.cli.audit:audit_group",
        "The tamper-evident audit log: who issued, revoked and refused what, and when.",
    ),
    "config": Lazy(
        "iotdlm.cli.config:config", "Configuration files: every key, its type and default (docs/configuration.md)."
    ),
    "demo": Lazy(
        "iotdlm.cli.demo:demo", "Run the whole system end to end on the embedded default and print what happened."
    ),
    "repo": Lazy(
        "iotdlm.cli.repository:repo",
        "The software vendor's remote repository (TUF): publish releases per device type, serve them to sm, "
        "and keep sm's signed download reports.",
    ),
    "sm": Lazy(
        "iotdlm.cli.sm:sm",
        "sm: software management: check the vendor repository, verify what it offers, store it for pm.",
    ),
    "cm": Lazy("iotdlm.cli.cm:cm", "cm: the only door to the outside -- EST, OCSP and CRLs in, sm's downloads out."),
    "pm": Lazy(
        "iotdlm.cli.pm:pm",
        "pm: the provisioning module -- flash verified software, truststore, config and device certificates "
        "into blank devices of one device type.",
    ),
    "transfer": Lazy(
        "iotdlm.cli.transfer:transfer",
        "Trust transfer: hand your fleet over to a new provider (you are SP1) or take one over (you are SP2).",
    ),
    "console": Lazy(
        "iotdlm.console.command:console",
        "The operator console in a browser: where it is, its HTTPS certificate, and the process itself.",
    ),
    "up": Lazy(
        "iotdlm.cli.modes:up",
        "Start NATS and the services a mode runs; supervise them until Ctrl-C / SIGTERM.",
    ),
    "mode": Lazy(
        "iotdlm.cli.modes:mode",
        "The operation mode: which modules run (provisioning, software or certificate management).",
    ),
    "down": Lazy(
        "iotdlm.cli.modes:down",
        "Stop the running supervisor of a deployment: every service in reverse order, then NATS.",
    ),
    "restart": Lazy(
        "iotdlm.cli.modes:restart",
        "Stop and start again some running services (after `ca rotate`, or a changed cm.toml); the mode stays.",
    ),
    "backup": Lazy(
        "iotdlm.cli.backup:backup",
        "Back up the data folder and its database into one archive (services may keep running).",
    ),
    "restore": Lazy(
        "iotdlm.cli.backup:restore",
        "Restore a data folder and its database from an archive made by `iotdlm backup`.",
    ),
    "status": Lazy(
        "iotdlm.cli.modes:status",
        "The operation mode and each service's health, and why a service that is not running stopped.",
    ),
}


@click.group(
    cls=LazyGroup,
    lazy_subcommands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.version_option(__version__, prog_name="iotdlm")
@click.option("-v", "--verbose", is_flag=True, help="Log more (to stderr).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="IOTDLM_LOG_FORMAT",  # iotdlm.cli.logformat.LOG_FORMAT_ENV (imported only when a command runs)
    show_envvar=True,
    help="Log lines as text or as one JSON object per line (the services `up` starts follow it).",
)
def main(verbose: bool, log_format: str) -> None:
    """iotdlm: device-lifecycle security for IoT and industrial fleets.

    Start with `iotdlm demo`, or `iotdlm init --data DIR` for a deployment of your own.
    Shell completion: see docs/operations.md ("Shell completion").
    """
    from iotdlm.cli.logformat import LOG_FORMAT_ENV, formatter

    os.environ[LOG_FORMAT_ENV] = log_format  # the services `iotdlm up` starts inherit it
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, handlers=[handler])


if __name__ == "__main__":
    main()
